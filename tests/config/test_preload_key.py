"""``preload:`` (top level) and ``detach:`` (a managed worker's): what loads, and every refusal
located at file:line:col as ``serve --check`` prints it."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpubroker.cli.main import app
from gpubroker.config.load import load_config_file
from gpubroker.errors import ConfigError

BACKENDS = """\
backends:
  - name: ollama
    proxyPort: 5001
    upstream: http://127.0.0.1:11434
    unloadStrategy: ollama
  - name: comfy
    proxyPort: 5002
    upstream: http://127.0.0.1:8188
    unloadStrategy: comfyui
    models: [sdxl, {name: flux, aliases: [flux-dev]}]
  - name: w
    proxyPort: 5003
    upstream: http://127.0.0.1:8081
    unloadStrategy: process
    command: [llama-server, --port, "{port}"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gpubroker.yaml"
    path.write_text(text)
    return path


def test_backends_and_units_load_in_order_an_alias_named_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, "preload: [w, ollama/llama3.1:8b, comfy/flux-dev]\n" + BACKENDS)
    cfg = load_config_file(path)
    assert cfg.preload == ("w", "ollama/llama3.1:8b", "comfy/flux-dev")
    assert cfg.to_dict()["preload"] == ["w", "ollama/llama3.1:8b", "comfy/flux-dev"]
    assert load_config_file(write(tmp_path, BACKENDS)).preload == ()


@pytest.mark.parametrize(
    ("entries", "at", "message"),
    [
        (
            "[olama]",
            "1:11",
            "preload[0]: unknown backend 'olama' in preload (did you mean 'ollama'?)",
        ),
        ("[comfy/sd15]", "1:11", "preload[0]: comfy declares no model 'sd15'"),
        ("[ollama/]", "1:11", "preload[0]: 'ollama/' names no model after the /"),
        ("[w, comfy/flux, comfy/flux-dev]", "1:26", "preload[2]: 'comfy/flux' is also preload[1]"),
        ("ollama", "1:1", "preload: expected a non-empty list of strings, found 'ollama'"),
    ],
    ids=["unknown-backend", "undeclared-model", "no-model", "twice-by-alias", "not-a-list"],
)
def test_a_bad_entry_is_a_located_error(
    tmp_path: Path, entries: str, at: str, message: str
) -> None:
    path = write(tmp_path, f"preload: {entries}\n" + BACKENDS)
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert str(err.value).startswith(f"{path}:{at}: {message}")


def test_detach_is_for_managed_workers_only(tmp_path: Path) -> None:
    text = BACKENDS.replace(
        "    unloadStrategy: comfyui\n", "    unloadStrategy: comfyui\n    detach: true\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config_file(write(tmp_path, text))
    assert "backends[1].detach: detach is for a managed worker" in str(err.value)
    assert ":10:5:" in str(err.value)
    cfg = load_config_file(write(tmp_path, BACKENDS + "    detach: true\n"))
    assert [b.detach for b in cfg.backends] == [False, False, True]


def test_serve_check_shows_the_preload(tmp_path: Path) -> None:
    path = write(tmp_path, "preload: [w, comfy/sdxl]\n" + BACKENDS)
    result = CliRunner().invoke(app, ["serve", "--check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "preload: w, comfy/sdxl" in result.output
