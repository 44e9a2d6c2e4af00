"""``stateDir`` and where learned state is kept (``state_path``); what a backend may be named."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from gpubroker.config.load import load_config_file, parse_config, state_path
from gpubroker.config.model import Config
from gpubroker.errors import ConfigError

NO_STATE = Config(backends=())


def test_default_is_under_xdg_state_home() -> None:
    env = {"XDG_STATE_HOME": "/xdg/state", "HOME": "/home/u"}
    assert state_path(NO_STATE, env) == Path("/xdg/state/gpubroker")


def test_default_without_xdg_state_home_is_under_home() -> None:
    assert state_path(NO_STATE, {"HOME": "/home/u"}) == Path("/home/u/.local/state/gpubroker")
    # Empty, or relative (which the XDG spec says to ignore): the same default.
    for xdg in ("", "state"):
        env = {"XDG_STATE_HOME": xdg, "HOME": "/home/u"}
        assert state_path(NO_STATE, env) == Path("/home/u/.local/state/gpubroker")


def test_default_without_home_in_env_uses_the_users_home() -> None:
    assert state_path(NO_STATE, {}) == Path.home() / ".local" / "state" / "gpubroker"


def test_state_dir_wins_and_expands_home() -> None:
    env = {"XDG_STATE_HOME": "/xdg/state", "HOME": "/home/u"}
    assert state_path(Config(backends=(), state_dir="/var/lib/gb"), env) == Path("/var/lib/gb")
    assert state_path(Config(backends=(), state_dir="~/gb"), env) == Path("/home/u/gb")
    assert state_path(Config(backends=(), state_dir="~"), env) == Path("/home/u")


def test_relative_state_dir_is_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "gpubroker.yaml"
    path.write_text("stateDir: state/gpubroker\nbackends: []\n")
    monkeypatch.chdir(tmp_path)  # not the file's folder, and the file named relatively
    cfg = load_config_file(Path("etc/gpubroker.yaml"))
    assert cfg.state_dir == str(tmp_path / "etc" / "state" / "gpubroker")
    assert state_path(cfg, {}) == tmp_path / "etc" / "state" / "gpubroker"
    # serve --check prints it resolved, and that loads back the same.
    again = parse_config(json.loads(json.dumps(cfg.to_dict())), source="again")
    assert replace(again, source=cfg.source) == cfg
    # "~" is left for state_path, which expands it with the env's HOME.
    path.write_text("stateDir: ~/gb\nbackends: []\n")
    cfg = load_config_file(path)
    assert cfg.state_dir == "~/gb"
    assert state_path(cfg, {"HOME": "/home/u"}) == Path("/home/u/gb")


def test_relative_state_dir_without_a_file_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_config({"stateDir": "state", "backends": []})
    assert state_path(cfg, {}) == tmp_path / "state"


@pytest.mark.parametrize(
    ("value", "found"),
    [('""', "''"), ("[a]", "a list"), ("3", "3")],
)
def test_state_dir_must_be_a_path(tmp_path: Path, value: str, found: str) -> None:
    path = tmp_path / "gpubroker.yaml"
    path.write_text(f"statusPort: 5102\nstateDir: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == f"{path}:2:1: stateDir: expected a non-empty string, found {found}"


# --- backend names ---------------------------------------------------------------------------

NAME_RULE = (
    'expected a name without "/", spaces or control characters (it appears in URLs such as '
    "/proxy/NAME/ and in the unit names NAME/MODEL)"
)


@pytest.mark.parametrize(
    ("written", "found"),
    [
        ("ollama/big", "'ollama/big'"),
        ('"my ollama"', "'my ollama'"),
        ('"ollama "', "'ollama '"),
        ('"tab\\tbed"', "'tab\\tbed'"),
        ('"bell\\a"', "'bell\\x07'"),
        ('"nbsp\\u00a0"', "'nbsp\\xa0'"),
    ],
)
def test_backend_names_that_cannot_name_a_unit_or_url(
    tmp_path: Path, written: str, found: str
) -> None:
    path = tmp_path / "gpubroker.yaml"
    path.write_text(
        "backends:\n"
        "  - proxyPort: 5001\n"
        f"    name: {written}\n"
        "    upstream: http://127.0.0.1:11434\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == f"{path}:3:5: backends[0].name: {NAME_RULE}, found {found}"


@pytest.mark.parametrize("name", ["ollama", "comfy-ui_2", "vllm.big", "llama:8080", "gpu0@box"])
def test_usual_backend_names_load(name: str) -> None:
    cfg = parse_config(
        {"backends": [{"name": name, "proxyPort": 5001, "upstream": "http://127.0.0.1:1"}]}
    )
    assert cfg.backends[0].name == name
