"""Commands that talk to a running broker: ``status``, ``unload``, ``swap``.

Exit codes: 0 done, 1 the broker said no or the action failed, 2 usage or config error,
3 no broker reachable.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ..errors import UsageError
from .common import ConfigOption, JsonOption, TokenOption, UrlOption


def _print(data: dict[str, Any], as_json: bool, line: str) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else line)


def status(config: ConfigOption = None, url: UrlOption = None, json_: JsonOption = False) -> None:
    """Show who holds the GPU, what is queued and recent swaps."""
    from ..client import broker_target, call

    base, _ = broker_target(url, config, None)
    data = call("GET", base, "/", timeout=5.0)
    if json_:
        typer.echo(json.dumps(data, indent=2))
        return
    owner = data.get("vramOwner") or "nobody"
    typer.echo(
        f"GPU owner: {owner}   active: {data['activeRequests']}   queued: {data['queueLength']}"
        f"   swaps: {data['swapCount']}   uptime: {data['uptime']:.0f}s"
    )
    typer.echo(
        f"{'backend':<16}{'state':<11}{'active':>7}{'queued':>7}{'gpu':>7}{'pass':>7}  health"
    )
    for name, b in data.get("backends", {}).items():
        health = b.get("health", {}).get("status", "unknown")
        typer.echo(
            f"{name:<16}{b['state']:<11}{b['active']:>7}{b['queued']:>7}"
            f"{b['gpuRequests']:>7}{b['passthroughRequests']:>7}  {health}"
        )
    for swap in data.get("swaps", [])[:5]:
        evicted = ", ".join(swap["evicted"])
        phases = ", ".join(f"{p} {swap[p + 'Ms']:.0f}" for p in ("drain", "unload", "load"))
        typer.echo(
            f"swap {swap['at']}: {evicted} -> {swap['to'] or '-'} in {swap['totalMs']:.0f} ms "
            f"({phases})"
        )


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
    from ..client import AdminFailed, broker_target, call

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
    from ..client import broker_target, call

    base, tok = broker_target(url, config, token)
    data = call("POST", base, "/api/swap", token=tok, json={"backend": name})
    evicted = ", ".join(data.get("evicted", [])) or "nothing"
    _print(data, json_, f"{name} owns the GPU (evicted {evicted}) after {data.get('ms', 0):.0f} ms")
