"""``gpubroker workers …``: managed worker processes (their machinery lands with that issue)."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import ConfigOption, UrlOption, friendly, not_yet

app = typer.Typer(
    name="workers",
    help="Manage GPU worker processes that gpubroker starts, pins and stops itself.",
    no_args_is_help=True,
)

NameArg = Annotated[str | None, typer.Argument(help="Backend name of a managed worker.")]
AllOption = Annotated[bool, typer.Option("--all", help="Every managed worker.")]
_WHY = "managed workers come with the workers issue"


@app.command("list")
@friendly
def list_(config: ConfigOption = None, url: UrlOption = None) -> None:
    """List managed workers: state, PID, GPU, uptime, restarts, VRAM."""
    not_yet("`gpubroker workers list`", _WHY)


@app.command()
@friendly
def start(
    name: NameArg = None,
    all_: AllOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
) -> None:
    """Start a managed worker (or all of them) and wait until it is healthy."""
    not_yet("`gpubroker workers start`", _WHY)


@app.command()
@friendly
def stop(
    name: NameArg = None,
    all_: AllOption = False,
    pid: Annotated[int | None, typer.Option("--pid", help="Stop a stray GPU process.")] = None,
    config: ConfigOption = None,
    url: UrlOption = None,
) -> None:
    """Stop a managed worker (or all of them, or a stray GPU process by PID)."""
    not_yet("`gpubroker workers stop`", _WHY)


@app.command()
@friendly
def restart(
    name: Annotated[str, typer.Argument(help="Backend name of a managed worker.")],
    config: ConfigOption = None,
    url: UrlOption = None,
) -> None:
    """Stop then start a managed worker."""
    not_yet("`gpubroker workers restart`", _WHY)


@app.command()
@friendly
def ensure(
    name: NameArg = None,
    all_: AllOption = False,
    config: ConfigOption = None,
    url: UrlOption = None,
) -> None:
    """Start only what is not running; exit 0 when every named worker is ready."""
    not_yet("`gpubroker workers ensure`", _WHY)


@app.command()
@friendly
def logs(
    name: Annotated[str, typer.Argument(help="Backend name of a managed worker.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    config: ConfigOption = None,
    url: UrlOption = None,
) -> None:
    """Show a managed worker's captured log."""
    not_yet("`gpubroker workers logs`", _WHY)
