"""``server:``: which HTTP server serves every port, shown by ``serve --check``, and a clear
config error when ``server: uvicorn`` lacks its extra."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpubroker.cli.main import app
from gpubroker.proxy import uvicorn_server

runner = CliRunner()

CONFIG = """\
statusPort: 5102
server: uvicorn
backends:
  - name: ollama
    proxyPort: 5001
    upstream: http://127.0.0.1:11434
    unloadStrategy: ollama
"""


def test_serve_check_shows_the_server(clean_env: Path) -> None:
    if uvicorn_server.available() is not None:
        pytest.skip("needs the fast extra")
    path = clean_env / "gpubroker.yaml"
    path.write_text(CONFIG)
    result = runner.invoke(app, ["serve", "--check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    head, _, body = result.stdout.partition("\n{")
    assert "server: uvicorn" in head.splitlines()
    assert json.loads("{" + body)["server"] == "uvicorn"
    path.write_text(CONFIG.replace("server: uvicorn\n", ""))
    result = runner.invoke(app, ["serve", "--check", "-c", str(path)])
    assert "server: hypercorn" in result.stdout.splitlines()  # the default


def test_uvicorn_without_its_extra_is_a_config_error_at_its_line(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(uvicorn_server, "available", lambda: uvicorn_server.MISSING)
    path = clean_env / "gpubroker.yaml"
    path.write_text(CONFIG)
    result = runner.invoke(app, ["serve", "--check", "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"gpubroker: error: {path}:2:1: server: uvicorn with httptools is not installed "
        "(the `fast` extra): pip install 'gpubroker[fast]'\n"
    )


def test_an_unknown_server_is_refused(clean_env: Path) -> None:
    path = clean_env / "gpubroker.yaml"
    path.write_text(CONFIG.replace("server: uvicorn", "server: granian"))
    result = runner.invoke(app, ["serve", "--check", "-c", str(path)])
    assert result.exit_code == 2
    assert "server: expected one of hypercorn, uvicorn, found 'granian'" in result.stderr
