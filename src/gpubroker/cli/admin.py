"""Commands that talk to a running broker: ``status``, ``unload``, ``swap``."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import ConfigOption, JsonOption, TokenOption, UrlOption, not_yet


def status(config: ConfigOption = None, url: UrlOption = None, json_: JsonOption = False) -> None:
    """Show who holds the GPU, what is queued and recent swaps."""
    not_yet("`gpubroker status`", "the broker comes with the broker issue")


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
    not_yet("`gpubroker unload`", "the broker comes with the broker issue")


def swap(
    name: Annotated[str, typer.Argument(help="Backend to make the GPU's owner.")],
    config: ConfigOption = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json_: JsonOption = False,
) -> None:
    """Make a backend the GPU's owner now (frees the others, preloads or wakes it)."""
    not_yet("`gpubroker swap`", "the broker comes with the broker issue")
