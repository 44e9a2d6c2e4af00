"""The command tree through Typer's CliRunner: help, exit codes, one-line errors, serve --check."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpubroker import __version__
from gpubroker.cli.main import app

runner = CliRunner()

GOOD = """\
statusPort: 5102
backends:
  - name: ollama
    proxyPort: 5001
    upstream: http://127.0.0.1:11434
    unloadStrategy: ollama
  - name: comfyui
    proxyPort: 5002
    upstream: http://127.0.0.1:8188
    unloadStrategy: comfyui
"""


def write(directory: Path, text: str, name: str = "gpubroker.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def assert_one_line_error(result: object, code: int = 2) -> str:
    """The CLI's contract for known errors: exit code, one line on stderr, no traceback."""
    assert result.exit_code == code, result.output  # type: ignore[attr-defined]
    err: str = result.stderr  # type: ignore[attr-defined]
    assert err.startswith("gpubroker: error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in result.output  # type: ignore[attr-defined]
    return err.removeprefix("gpubroker: error: ").rstrip("\n")


def test_help_shows_the_command_tree() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("init", "serve", "status", "swap", "unload", "workers", "plugins", "demo"):
        assert f" {command} " in result.stdout, command
    result = runner.invoke(app, ["workers", "--help"])
    assert result.exit_code == 0
    for command in ("list", "start", "stop", "restart", "ensure", "logs"):
        assert f" {command} " in result.stdout, command


@pytest.mark.parametrize(
    "command",
    [
        ["init"],
        ["serve"],
        ["status"],
        ["swap"],
        ["unload"],
        ["plugins"],
        ["demo"],
        ["workers", "list"],
        ["workers", "start"],
        ["workers", "stop"],
        ["workers", "restart"],
        ["workers", "ensure"],
        ["workers", "logs"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: gpubroker" in result.stdout or "Usage: root" in result.stdout


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert result.exit_code == 2
    assert "Usage:" in result.stdout


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"gpubroker {__version__}\n"


@pytest.mark.parametrize(
    "command",
    [
        ["workers", "list"],
        ["workers", "start", "llama"],
        ["workers", "stop", "--all"],
        ["workers", "restart", "llama"],
        ["workers", "ensure", "--all"],
        ["workers", "logs", "llama"],
    ],
)
def test_worker_commands_without_a_broker_exit_3_in_one_line(
    command: list[str], clean_env: Path
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    message = assert_one_line_error(runner.invoke(app, [*command, "--url", url]), code=3)
    assert "no broker answering" in message


def test_unknown_command_is_a_usage_error() -> None:
    result = runner.invoke(app, ["sevre"])
    assert result.exit_code == 2
    assert "No such command" in result.output


# --- serve --check --------------------------------------------------------------------------


def test_serve_check_prints_the_resolved_config(clean_env: Path) -> None:
    path = write(clean_env, GOOD)
    result = runner.invoke(app, ["serve", "--check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    head, _, body = result.stdout.partition("\n{")
    assert head.splitlines()[0] == f"config: {path}"
    assert "  ollama: :5001 -> http://127.0.0.1:11434 (strategy ollama" in head
    resolved = json.loads("{" + body)
    assert resolved["statusPort"] == 5102
    assert [b["name"] for b in resolved["backends"]] == ["ollama", "comfyui"]
    assert resolved["backends"][1]["unloadStrategy"] == "comfyui"


def test_serve_check_finds_the_config_in_the_usual_places(clean_env: Path) -> None:
    write(clean_env, GOOD, "onegpu4all.yaml")
    result = runner.invoke(app, ["serve", "--check"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"config: {clean_env / 'onegpu4all.yaml'}\n")


def test_serve_check_unknown_strategy(clean_env: Path) -> None:
    path = write(clean_env, GOOD.replace("unloadStrategy: comfyui", "unloadStrategy: comfy"))
    message = assert_one_line_error(runner.invoke(app, ["serve", "--check", "-c", str(path)]))
    assert message.startswith(
        f"{path}:10:5: backends[1].unloadStrategy: unknown strategy 'comfy' "
        "(known: comfyui, generic, ollama, "
    )


def test_serve_check_config_errors(clean_env: Path) -> None:
    path = write(clean_env, GOOD.replace("proxyPort: 5002", "proxyPort: 5001"))
    message = assert_one_line_error(runner.invoke(app, ["serve", "--check", "-c", str(path)]))
    assert message == f"{path}:8:5: backends[1].proxyPort: port 5001 is already used by " + (
        "backends[0] (ollama)"
    )

    path = write(clean_env, "backends:\n  - name: [oops\n")
    message = assert_one_line_error(runner.invoke(app, ["serve", "--check", "-c", str(path)]))
    assert message.startswith(f"{path}:3:1: invalid YAML: ")

    message = assert_one_line_error(
        runner.invoke(app, ["serve", "--check", "-c", str(clean_env / "missing.yaml")])
    )
    assert message == f"{clean_env / 'missing.yaml'}: no such file"


def test_serve_check_uses_gpubroker_config_env(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(clean_env, GOOD, "elsewhere.yaml")
    monkeypatch.setenv("GPUBROKER_CONFIG", str(path))
    result = runner.invoke(app, ["serve", "--check"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"config: {path}\n")


def test_serve_check_env_quick_mode(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_UPSTREAM", "http://127.0.0.1:11434")
    monkeypatch.setenv("COMFYUI_UPSTREAM", "http://127.0.0.1:8188")
    monkeypatch.setenv("BROKER_OLLAMA_PORT", "6001")
    monkeypatch.setenv("BROKER_COMFYUI_PORT", "6002")
    monkeypatch.setenv("BROKER_STATUS_PORT", "6100")
    result = runner.invoke(app, ["serve", "--check"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("config: environment\n")
    assert "status: http://127.0.0.1:6100" in result.stdout
    assert "  ollama: :6001 -> http://127.0.0.1:11434 (strategy ollama" in result.stdout
    assert "  comfyui: :6002 -> http://127.0.0.1:8188 (strategy comfyui" in result.stdout

    monkeypatch.setenv("BROKER_COMFYUI_PORT", "99999")
    message = assert_one_line_error(runner.invoke(app, ["serve", "--check"]))
    assert message == "$BROKER_COMFYUI_PORT: expected a port number from 1 to 65535, found '99999'"


def test_serve_check_without_any_config(clean_env: Path) -> None:
    message = assert_one_line_error(runner.invoke(app, ["serve", "--check"]))
    assert message.startswith("no config found (looked in ")
    assert "gpubroker init" in message


def test_serve_refuses_an_api_port_beyond_loopback_without_keys(clean_env: Path) -> None:
    """Issue 12: one port that reaches every model must not be open to the network unasked."""
    path = write(clean_env, "bind: 0.0.0.0\napiPort: 5100\n" + GOOD)
    for args in (["serve", "-c", str(path)], ["serve", "--check", "-c", str(path)]):
        message = assert_one_line_error(runner.invoke(app, args))
        assert message.startswith(f"{path}:2:1: apiPort: the apiPort would listen on 0.0.0.0")
        assert "apiKeys" in message


def test_serve_check_never_prints_an_api_key_or_the_admin_token(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written, from_env = "sk-written-in-the-file-0123456789", "sk-from-the-environment-987654"
    monkeypatch.setenv("NIGHTLY_KEY", from_env)
    keys = (
        "bind: 0.0.0.0\napiPort: 5100\nadminToken: admin-token-in-the-file-42\napiKeys:\n"
        f"  - {{name: ci, key: {written}}}\n"
        '  - {name: nightly, key: "env:NIGHTLY_KEY", models: [llama3:8b]}\n'
    )
    path = write(clean_env, keys + GOOD)
    result = runner.invoke(app, ["serve", "--check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert written not in result.output and from_env not in result.output
    assert "apiKeys: ci, nightly (from $NIGHTLY_KEY) [models: llama3:8b]" in result.stdout
    resolved = json.loads("{" + result.stdout.partition("\n{")[2])
    assert [k["key"] for k in resolved["apiKeys"]] == ["(hidden)", "env:NIGHTLY_KEY"]
    assert "admin-token-in-the-file-42" not in result.output
    assert resolved["adminToken"] == "(hidden)"


# --- plugins --------------------------------------------------------------------------------


def test_plugins_lists_builtins_with_their_package(clean_env: Path) -> None:
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "strategies:"
    assert "classifiers:" in lines and "telemetry:" in lines
    ollama = next(line for line in lines if line.startswith("  ollama "))
    assert f"gpubroker {__version__}" in ollama


def test_plugins_json_and_disable_list_from_config(clean_env: Path) -> None:
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert {"strategies", "classifiers", "telemetry", "disabled"} <= set(listed)
    nvml = next(p for p in listed["telemetry"] if p["name"] == "nvml")
    assert nvml["plugin"] == "builtin-telemetry"
    assert nvml["package"] == "gpubroker"

    write(clean_env, "disablePlugins: [builtin-telemetry]\n")  # found in the cwd
    listed = json.loads(runner.invoke(app, ["plugins", "--json"]).stdout)
    assert listed["telemetry"] == []
    assert listed["disabled"] == ["builtin-telemetry"]


def test_plugins_with_a_broken_config(clean_env: Path) -> None:
    path = write(clean_env, "disablePlugins: sdwebui\n", "bad.yaml")
    message = assert_one_line_error(runner.invoke(app, ["plugins", "-c", str(path)]))
    assert message == (
        f"{path}:1:1: disablePlugins: expected a non-empty list of strings, found 'sdwebui'"
    )
    # Without --config a broken config in the usual place does not hide the list.
    write(clean_env, "disablePlugins: sdwebui\n")
    assert runner.invoke(app, ["plugins"]).exit_code == 0


def test_plugins_with_a_plugin_that_fails_to_import(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = clean_env / "site"
    info = site / "gpubroker_broken-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gpubroker-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[gpubroker]\nbroken = gpubroker_cli_broken\n")
    (site / "gpubroker_cli_broken.py").write_text("import gpubroker_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(site))
    message = assert_one_line_error(runner.invoke(app, ["plugins"]))
    assert message == (
        "plugin 'broken' (package gpubroker-broken 0.1) failed to import: "
        "ModuleNotFoundError: No module named 'gpubroker_no_such_dependency'; "
        "uninstall it or disable it with GPUBROKER_DISABLE_PLUGINS=broken"
    )
    monkeypatch.setenv("GPUBROKER_DISABLE_PLUGINS", "broken")
    assert runner.invoke(app, ["plugins"]).exit_code == 0


# --- the real console script ----------------------------------------------------------------


def gpubroker_script() -> str:
    script = Path(sys.executable).with_name("gpubroker")
    assert script.exists(), f"{script} is missing: install the project (pip install -e .)"
    return str(script)


def test_console_script_errors_are_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("upstream: http://127.0.0.1:8188", "upstream: :8188"))
    done = subprocess.run(
        [gpubroker_script(), "serve", "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(tmp_path)},
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        f"gpubroker: error: {path}:9:5: backends[1].upstream: expected an http:// or https:// "
        "URL with a host and no path, such as http://127.0.0.1:11434, found ':8188'\n"
    )


def test_the_demo_runs_the_readmes_main_job_and_leaves_no_state_behind(
    own_state_dir: Path,
) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("gpubroker")), "demo", "-n", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XDG_STATE_HOME": str(own_state_dir)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "With gpubroker: 3 ok, 0 failed, 0 simulated OOMs" in result.stdout
    assert not any(own_state_dir.iterdir())  # the demo's learned sizes stay with the demo


def test_demo_keep_prints_a_dashboard_that_answers_and_stops_cleanly_on_ctrl_c(
    own_state_dir: Path,
) -> None:
    import re
    import signal
    import urllib.request

    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("gpubroker")), "demo", "--keep", "-n", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "XDG_STATE_HOME": str(own_state_dir)},
    )
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if m := re.search(r"Dashboard: (http://127\.0\.0\.1:\d+/ui/)", line):
                url = m.group(1)
        assert url is not None, "the demo printed no dashboard URL"
        with urllib.request.urlopen(url, timeout=10) as page:  # the page the user opens
            assert page.status == 200 and b"app.js" in page.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "stopping." in out
