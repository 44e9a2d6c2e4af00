"""``gpubroker workers …``: managed worker processes, through a running broker's admin API.

Exit codes, as for ``unload`` and ``swap``: 0 done, 1 the broker said no or a worker failed,
2 usage or config error, 3 no broker reachable.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from gpubroker.cli.common import ConfigOption, JsonOption, TokenOption, UrlOption, friendly
from gpubroker.errors import AdminFailed, UsageError

app = typer.Typer(
    name="workers",
    help="Manage GPU worker processes that gpubroker starts, pins and stops itself.",
    no_args_is_help=True,
)

NameArg = Annotated[str | None, typer.Argument(help="Backend name of a managed worker.")]
AllOption = Annotated[bool, typer.Option("--all", help="Every managed worker.")]
FOLLOW_POLL = 0.5  # seconds between log polls with -f


def _one_or_all(name: str | None, all_: bool) -> dict[str, Any]:
    if (name is None) == (not all_):
        raise UsageError("name one worker, or pass --all (not both)")
    if name is not None and not name.strip():
        raise UsageError("the worker name is empty")
    return {"all": True} if all_ else {"name": name}


def _verb(
    path: str,
    body: dict[str, Any],
    url: str | None,
    config: Any,
    token: str | None,
    json_: bool,
) -> None:
    """POST a verb, print one line per worker, exit 1 when any of them failed."""
    from gpubroker.cli.client import broker_target, call

    base, tok = broker_target(url, config, token)
    data = call("POST", base, path, token=tok, json=body, timeout=None)
    results = data.get("results", [])
    if json_:
        typer.echo(json.dumps(data, indent=2))
    else:
        if not results:
            typer.echo("no managed workers (give a backend `command:` to have one)")
        for r in results:
            typer.echo(r.get("message") or f"{r.get('name')}: {'ok' if r.get('ok') else 'failed'}")
            for line in r.get("logTail") or []:
                typer.echo(f"  | {line}")
    if not data.get("ok", False):
        failed = [r.get("name") or f"pid {r.get('pid')}" for r in results if not r.get("ok")]
        raise AdminFailed(f"failed: {', '.join(str(f) for f in failed)}")


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**30:.1f}GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f}MiB"


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@app.command("list")
@friendly
def list_(
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_: JsonOption = False,
) -> None:
    """List managed workers: state, PID, GPU, uptime, restarts, VRAM (and, with the admin
    token, the log tail of a failed one)."""
    from gpubroker.cli.client import broker_target, call

    base, tok = broker_target(url, config, token)
    data = call("GET", base, "/api/workers", token=tok, timeout=10.0)
    workers = data.get("workers", [])
    if json_:
        typer.echo(json.dumps(data, indent=2))
        return
    if not workers:
        typer.echo("no managed workers (give a backend `command:` to have one)")
        return
    typer.echo(
        f"{'worker':<16}{'state':<10}{'pid':>8}  {'gpu':<14}{'uptime':>8}{'restarts':>9}{'vram':>9}"
    )
    for w in workers:
        gpu = ",".join(w.get("gpu") or []) or "-"
        gpu = gpu if len(gpu) <= 13 else gpu[:12] + "…"
        pid = w.get("pid") or "-"
        typer.echo(
            f"{w['name']:<16}{w['state']:<10}{pid!s:>8}  {gpu:<14}{_uptime(w.get('uptime')):>8}"
            f"{w.get('restarts', 0):>9}{_size(w.get('vram')):>9}"
        )
        if w.get("error"):
            typer.echo(f"  error: {w['error']}")
        for line in w.get("logTail") or []:
            typer.echo(f"  | {line}")
        if w["state"] == "failed" and "logTail" not in w:
            typer.echo("  (its log is for admins: pass the admin token, --token, to see it)")
        for warning in w.get("warnings") or []:
            typer.echo(f"  warning: {warning}")


@app.command()
@friendly
def start(
    name: NameArg = None,
    all_: AllOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_: JsonOption = False,
) -> None:
    """Start a managed worker (or all of them) and wait until it is healthy."""
    _verb("/api/workers/start", _one_or_all(name, all_), url, config, token, json_)


@app.command()
@friendly
def stop(
    name: NameArg = None,
    all_: AllOption = False,
    pid: Annotated[
        int | None,
        typer.Option("--pid", help="Stop a stray GPU process (or a leftover worker) by PID."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Do not wait for in-flight requests to finish.")
    ] = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_: JsonOption = False,
) -> None:
    """Stop a managed worker (or all of them, or a stray GPU process by PID)."""
    if pid is not None:
        if name is not None or all_:
            raise UsageError("give --pid alone, not with a name or --all")
        if pid <= 0:
            raise UsageError("--pid must be a positive process id")
        body: dict[str, Any] = {"pid": pid}
    else:
        body = _one_or_all(name, all_)
    _verb("/api/workers/stop", {**body, "force": force}, url, config, token, json_)


@app.command()
@friendly
def restart(
    name: Annotated[str, typer.Argument(help="Backend name of a managed worker.")],
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_: JsonOption = False,
) -> None:
    """Stop then start a managed worker (its in-flight requests finish first)."""
    _verb("/api/workers/restart", _one_or_all(name, False), url, config, token, json_)


@app.command()
@friendly
def ensure(
    name: NameArg = None,
    all_: AllOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_: JsonOption = False,
) -> None:
    """Start only what is not running; exit 0 when every named worker is ready."""
    _verb("/api/workers/ensure", _one_or_all(name, all_), url, config, token, json_)


@app.command()
@friendly
def logs(
    name: Annotated[str, typer.Argument(help="Backend name of a managed worker.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until Ctrl-C.")
    ] = False,
    lines: Annotated[
        int, typer.Option("--lines", "-n", min=1, max=100_000, help="How many recent lines.")
    ] = 100,
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Show a managed worker's captured output (stdout and stderr)."""
    from gpubroker.cli.client import broker_target, call

    if not name.strip():
        raise UsageError("the worker name is empty")
    base, tok = broker_target(url, config, token)
    path = f"/api/workers/{name}/logs"
    data = call("GET", base, f"{path}?limit={lines}", token=tok, timeout=10.0)
    for line in data.get("lines", []):
        typer.echo(line)
    if not follow:
        return
    cursor = int(data.get("next", 0))
    try:
        while True:
            time.sleep(FOLLOW_POLL)
            data = call("GET", base, f"{path}?since={cursor}", token=tok, timeout=10.0)
            for line in data.get("lines", []):
                typer.echo(line)
            cursor = int(data.get("next", cursor))
    except KeyboardInterrupt:
        return  # Ctrl-C is how -f ends: no traceback, exit 0
