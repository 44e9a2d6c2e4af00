"""Commands that talk to a running broker: ``status``, ``unload``, ``swap``, ``reload``.

Exit codes: 0 done, 1 the broker said no or the action failed, 2 usage or config error (a
reload of a broken file among them), 3 no broker reachable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from gpubroker.cli.common import ConfigOption, JsonOption, TokenOption, UrlOption
from gpubroker.errors import AdminFailed, UsageError


def _print(data: dict[str, Any], as_json: bool, line: str) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else line)


def status(
    config: ConfigOption = None,
    url: UrlOption = None,
    json_: JsonOption = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", "-w", help="A live dashboard, redrawn until Ctrl-C."),
    ] = False,
    interval: Annotated[
        float,
        typer.Option("--interval", min=0.2, max=60.0, help="Seconds between redraws (--watch)."),
    ] = 1.0,
) -> None:
    """Show who holds the GPU, what is queued, what each backend uses, and any warnings."""
    from rich.console import Console

    from gpubroker.cli.client import broker_target, call
    from gpubroker.cli.watch import as_status, render
    from gpubroker.cli.watch import watch as live

    if watch and json_:
        raise UsageError("--watch draws a dashboard; it does not combine with --json")
    base, _ = broker_target(url, config, None)
    if watch:
        live(base, interval=interval)
        return
    data = call("GET", base, "/", timeout=5.0)
    if json_:
        typer.echo(json.dumps(data, indent=2))
        return
    Console(soft_wrap=False).print(render(as_status(data), url=base))


def unload(
    name: Annotated[str | None, typer.Argument(help="Backend to unload.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Unload every backend.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Do not wait for in-flight work.")] = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_: JsonOption = False,
) -> None:
    """Free a backend's VRAM now (waits for its in-flight requests unless --force)."""
    from gpubroker.cli.client import broker_target, call

    if (name is None) == (not all_):
        raise UsageError("name one backend, or pass --all (not both)")
    base, tok = broker_target(url, config, token)
    data = call("POST", base, "/api/unload", token=tok, json={"backend": name, "force": force})
    unloaded = ", ".join(data.get("unloaded", [])) or "nothing"
    if not data.get("ok", False):
        if json_:
            typer.echo(json.dumps(data, indent=2))
        raise AdminFailed(f"unload of {unloaded} failed: {'; '.join(data.get('failures', []))}")
    ms = data.get("ms")
    _print(data, json_, f"unloaded {unloaded}" + (f" in {ms:.0f} ms" if ms is not None else ""))


def swap(
    name: Annotated[str, typer.Argument(help="Backend to make the GPU's owner.")],
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_: JsonOption = False,
) -> None:
    """Make a backend the GPU's owner now (frees the others, preloads or wakes it)."""
    from gpubroker.cli.client import broker_target, call

    base, tok = broker_target(url, config, token)
    data = call("POST", base, "/api/swap", token=tok, json={"backend": name})
    evicted = ", ".join(data.get("evicted", [])) or "nothing"
    _print(data, json_, f"{name} owns the GPU (evicted {evicted}) after {data.get('ms', 0):.0f} ms")


def reload(
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_: JsonOption = False,
) -> None:
    """Make the running broker re-read its config file and apply what changed.

    Every connection is kept; a broken file changes nothing (its error is printed, exit code
    2). The broker reads the file it was started with; --config only says where to find the
    broker."""
    from gpubroker.cli.client import broker_target, call
    from gpubroker.errors import ConfigError

    try:
        base, tok = broker_target(url, config, token)
    except ConfigError as error:  # broken: the broker is told (it logs it), found by the file
        if config is None:
            raise
        base, tok = _target_of_broken(url, config, token, error)
    data = call("POST", base, "/api/reload", token=tok, json={}, timeout=60.0)
    if not data.get("ok", False):
        if json_:
            typer.echo(json.dumps(data, indent=2))
        raise ConfigError(str(data.get("error") or "the broker could not reload its config"))
    changes = data.get("changes") or {}
    text = f"reloaded: {data.get('summary', 'done')}"
    if changes.get("needsRestart"):
        text += "\n(the keys that need a restart keep their running values until then)"
    _print(data, json_, text)


def _target_of_broken(
    url: str | None, config: Path, token: str | None, error: Exception
) -> tuple[str, str | None]:
    """The status URL and token a file that does not validate still names (its YAML read
    as it is); raises ``error`` when it cannot even be read."""
    import os

    from ruamel.yaml import YAML

    from gpubroker.config.model import DEFAULT_STATUS_PORT

    try:
        data = YAML(typ="safe").load(config.read_text(encoding="utf-8"))
    except Exception:
        raise error from None
    data = data if isinstance(data, dict) else {}
    port = data.get("statusPort", DEFAULT_STATUS_PORT)
    if not isinstance(port, int) or isinstance(port, bool):
        raise error
    url = url or os.environ.get("GPUBROKER_URL") or f"http://127.0.0.1:{port}"
    found = data.get("adminToken")
    token = token or os.environ.get("GPUBROKER_TOKEN")
    return url.rstrip("/"), token or (found if isinstance(found, str) else None)
