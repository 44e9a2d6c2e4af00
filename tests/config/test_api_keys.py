"""``apiKeys:`` and the rule that an ``apiPort`` beyond loopback needs them (issue 12)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from gpubroker.config.load import describe_config, load_config_file, parse_config
from gpubroker.config.model import HIDDEN_KEY, ApiKey
from gpubroker.errors import ConfigError

SECRET = "sk-0123456789abcdef-secret"
BACKEND = "backends:\n  - name: a\n    proxyPort: 5001\n    upstream: http://127.0.0.1:9000\n"


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> tuple[str, object]:
    path = tmp_path / "gpubroker.yaml"
    path.write_text(textwrap.dedent(text) + BACKEND, encoding="utf-8")
    try:
        return str(path), load_config_file(path, env or {})
    except ConfigError as exc:
        return str(path), exc


def test_keys_load_as_frozen_named_keys_with_optional_models(tmp_path: Path) -> None:
    _, cfg = load(
        tmp_path,
        f"""\
        apiPort: 5100
        apiKeys:
          - name: nightly
            key: {SECRET}
            models: [llama3:8b, reasoner]
          - {{name: ci, key: "env:CI_KEY"}}
        """,
        {"CI_KEY": "ci-key-from-the-environment"},
    )
    assert not isinstance(cfg, ConfigError), cfg
    assert cfg.api_port == 5100  # type: ignore[attr-defined]
    assert cfg.api_keys == (  # type: ignore[attr-defined]
        ApiKey("nightly", SECRET, ("llama3:8b", "reasoner")),
        ApiKey("ci", "ci-key-from-the-environment", None, env="CI_KEY"),
    )
    assert SECRET not in repr(cfg)  # a logged config never carries a key


def test_no_keys_and_no_api_port_by_default(tmp_path: Path) -> None:
    _, cfg = load(tmp_path, "")
    assert cfg.api_keys == () and cfg.api_port is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "env", "where", "message"),
    [
        ('apiKeys:\n  - {name: a, key: "env:NOPE"}\n', {}, "2:15: apiKeys[0].key",
         "the environment variable NOPE is not set (or empty)"),
        ('apiKeys:\n  - {name: a, key: "env:EMPTY"}\n', {"EMPTY": ""}, "2:15: apiKeys[0].key",
         "the environment variable EMPTY is not set (or empty)"),
        ('apiKeys:\n  - {name: a, key: "env:"}\n', {}, "2:15: apiKeys[0].key",
         "expected env:VARIABLE, with a variable name"),
        ('apiKeys:\n  - {name: a, key: "env:SHORT"}\n', {"SHORT": "tiny-secret"},
         "2:15: apiKeys[0].key",
         "$SHORT has 11 characters; an API key needs at least 16 (try `openssl rand -hex 24`)"),
        ("apiKeys:\n  - {name: a, key: short-secret}\n", {}, "2:15: apiKeys[0].key",
         "the key has 12 characters; an API key needs at least 16 (try `openssl rand -hex 24`)"),
        ('apiKeys:\n  - {name: a, key: ""}\n', {}, "2:15: apiKeys[0].key",
         "expected a non-empty string (or env:VARIABLE)"),
        ("apiKeys:\n  - {name: a, key: 12345678901234567}\n", {}, "2:15: apiKeys[0].key",
         "expected a non-empty string (or env:VARIABLE)"),
        ("apiKeys:\n  - {name: a}\n", {}, "2:5: apiKeys[0]", "missing required key 'key'"),
        (f"apiKeys:\n  - {{key: {SECRET}}}\n", {}, "2:5: apiKeys[0]",
         "missing required key 'name'"),
        (f"apiKeys:\n  - {{name: a, key: {SECRET}}}\n  - {{name: a, key: {SECRET}x}}\n", {},
         "3:6: apiKeys[1].name", "duplicate key name 'a' (also apiKeys[0])"),
        (f"apiKeys:\n  - {{name: a, key: {SECRET}, models: []}}\n", {},
         "2:48: apiKeys[0].models", "expected a non-empty list of strings, found a list"),
        (f"apiKeys:\n  - {{name: a, key: {SECRET}, token: x}}\n", {},
         "2:48: apiKeys[0].token", "unknown key (known keys: name, key, models)"),
        ("apiKeys: nightly\n", {}, "1:1: apiKeys", "expected a list of keys, found 'nightly'"),
    ],
)  # fmt: skip
def test_key_errors_are_located_and_never_quote_the_key(
    tmp_path: Path, text: str, env: dict[str, str], where: str, message: str
) -> None:
    path, err = load(tmp_path, text, env)
    assert isinstance(err, ConfigError)
    assert str(err) == f"{path}:{where}: {message}"
    for value in (SECRET, "tiny-secret", "short-secret"):
        assert value not in str(err)


def test_an_api_port_beyond_loopback_needs_keys(tmp_path: Path) -> None:
    path, err = load(tmp_path, "bind: 0.0.0.0\napiPort: 5100\n")
    assert isinstance(err, ConfigError) and err.exit_code == 2
    assert str(err).startswith(f"{path}:2:1: apiPort: the apiPort would listen on 0.0.0.0")
    assert "add `apiKeys:`" in str(err)
    for fine in (
        "bind: 0.0.0.0\napiPort: 5100\napiKeys:\n  - {name: a, key: " + SECRET + "}\n",
        "bind: 127.0.0.1\napiPort: 5100\n",
        "bind: localhost\napiPort: 5100\n",
        "bind: ::1\napiPort: 5100\n",
        "apiPort: 5100\n",
        "bind: 0.0.0.0\n",  # no api port: the proxy ports are as they always were
    ):
        _, cfg = load(tmp_path, fine)
        assert not isinstance(cfg, ConfigError), (fine, cfg)


def test_check_output_shows_names_and_variables_never_keys(tmp_path: Path) -> None:
    _, cfg = load(
        tmp_path,
        f"""\
        apiKeys:
          - {{name: nightly, key: {SECRET}, models: [llama3:8b]}}
          - {{name: ci, key: "env:CI_KEY"}}
        """,
        {"CI_KEY": "ci-key-from-the-environment"},
    )
    assert not isinstance(cfg, ConfigError), cfg
    exported = cfg.to_dict()  # type: ignore[attr-defined]
    assert exported["apiKeys"] == [
        {"name": "nightly", "key": HIDDEN_KEY, "models": ["llama3:8b"]},
        {"name": "ci", "key": "env:CI_KEY"},
    ]
    text = describe_config(cfg) + json.dumps(exported)  # type: ignore[arg-type]
    assert "apiKeys: nightly [models: llama3:8b], ci (from $CI_KEY)" in text
    assert SECRET not in text and "ci-key-from-the-environment" not in text
    # the env-read key loads back as itself
    again = parse_config({"apiKeys": [exported["apiKeys"][1]]}, env={"CI_KEY": "x" * 16})
    assert again.api_keys == (ApiKey("ci", "x" * 16, None, env="CI_KEY"),)
