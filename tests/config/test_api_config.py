"""The api port's keys: apiPort, apiBodyLimit, modelRefresh and per-backend models:."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpubroker.config.load import describe_config, load_config_file
from gpubroker.config.model import ModelSpec
from gpubroker.errors import ConfigError

BASE = """\
apiPort: 5100
apiBodyLimit: 8MiB
modelRefresh: 10s
backends:
  - name: ollama
    proxyPort: 5001
    upstream: http://127.0.0.1:11434
{extra}"""


def load(tmp_path: Path, extra: str = "", text: str | None = None) -> object:
    path = tmp_path / "gpubroker.yaml"
    path.write_text(text if text is not None else BASE.format(extra=extra))
    return load_config_file(path)


def error(tmp_path: Path, extra: str = "", text: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra, text)
    return str(info.value)


def test_the_api_keys_load_and_round_trip(tmp_path: Path) -> None:
    extra = "    models: [llama3:8b, {name: qwen2.5:14b, aliases: [reasoner], vram: 14GiB}]\n"
    cfg = load(tmp_path, extra)
    assert cfg.api_port == 5100 and cfg.api_body_limit == 8 * 2**20  # type: ignore[attr-defined]
    assert cfg.model_refresh == 10.0  # type: ignore[attr-defined]
    assert cfg.backends[0].models == (  # type: ignore[attr-defined]
        ModelSpec("llama3:8b"),
        ModelSpec("qwen2.5:14b", aliases=("reasoner",), vram=14 * 2**30),
    )
    out = cfg.to_dict()  # type: ignore[attr-defined]
    assert out["apiPort"] == 5100
    assert out["backends"][0]["models"] == [
        "llama3:8b",
        {"name": "qwen2.5:14b", "aliases": ["reasoner"], "vram": 14 * 2**30},
    ]
    summary = describe_config(cfg)  # type: ignore[arg-type]
    assert "api: http://127.0.0.1:5100/v1" in summary and "reasoner" in summary


def test_defaults_leave_the_api_port_off(tmp_path: Path) -> None:
    cfg = load(tmp_path, text="backends: []\n")
    assert cfg.api_port is None and cfg.api_body_limit == 64 * 2**20  # type: ignore[attr-defined]
    assert cfg.model_refresh == 30.0  # type: ignore[attr-defined]
    assert cfg.backends == ()  # type: ignore[attr-defined]


def test_each_bad_value_is_a_located_error(tmp_path: Path) -> None:
    path = tmp_path / "gpubroker.yaml"
    assert error(tmp_path, text="apiPort: 0\n") == (
        f"{path}:1:1: apiPort: expected a port number from 1 to 65535, found 0"
    )
    assert "modelRefresh: expected an interval of at least 100ms" in error(
        tmp_path, text="modelRefresh: 1ms\n"
    )
    assert "apiBodyLimit: expected a size" in error(tmp_path, text="apiBodyLimit: lots\n")
    got = error(tmp_path, "    models: [a, {name: b, vram: huge}]\n")
    assert f"{path}:8:27:" in got and "backends[0].models[1].vram: expected a size" in got
    got = error(tmp_path, "    models: [a, {aliases: [b]}]\n")
    assert "backends[0].models[1]: missing required key 'name'" in got
    got = error(tmp_path, "    models: [a, {name: b, aliases: [a]}]\n")
    assert "model name 'a' is also backends[0].models[0]" in got
    assert "models: expected a non-empty list" in error(tmp_path, "    models: []\n")
    got = error(tmp_path, "    models: [{name: a, upstream: b}]\n")
    assert "did you mean 'upstreamModel'" in got


def test_the_api_port_may_not_take_another_listeners_port(tmp_path: Path) -> None:
    got = error(tmp_path, text=BASE.format(extra="").replace("apiPort: 5100", "apiPort: 5001"))
    assert "apiPort: port 5001 is ollama's proxyPort" in got
    got = error(tmp_path, text="apiPort: 5102\n")
    assert "port 5102 is the statusPort" in got
