"""Options and helpers shared by the commands. Imports stay light: completion runs through here."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from gpubroker.errors import GPUBrokerError

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config file (default: $GPUBROKER_CONFIG, ./gpubroker.yaml, ./onegpu4all.yaml, "
        "~/.config/gpubroker/gpubroker.yaml, then the OLLAMA_UPSTREAM/COMFYUI_UPSTREAM env vars).",
        dir_okay=False,
    ),
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="Status URL of a running broker (default: $GPUBROKER_URL, else the config's "
        "statusPort on 127.0.0.1).",
        envvar="GPUBROKER_URL",
        show_envvar=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a summary line.")]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Admin token for the broker (default: $GPUBROKER_TOKEN, else the config's "
        "adminToken).",
        envvar="GPUBROKER_TOKEN",
        show_envvar=False,
    ),
]


def fail(error: GPUBrokerError) -> NoReturn:
    typer.echo(f"gpubroker: error: {error}", err=True)
    raise typer.Exit(error.exit_code)


F = TypeVar("F", bound=Callable[..., Any])


def reflowed(doc: str | None) -> str | None:
    """A command's docstring as its help: each paragraph one line, for the terminal to wrap
    (Typer keeps a docstring's own line breaks, which a narrower or wider terminal breaks up)."""
    if doc is None:
        return None
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def friendly(fn: F) -> F:
    """Turn a known error inside a command into one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GPUBrokerError as exc:
            fail(exc)
        except BaseExceptionGroup as group:  # raised inside a task group (e.g. a port in use)
            known = _known_error(group)
            if known is None:
                raise
            fail(known)

    return wrapper  # type: ignore[return-value]


def _known_error(group: BaseExceptionGroup) -> GPUBrokerError | None:
    for exc in group.exceptions:
        if isinstance(exc, GPUBrokerError):
            return exc
        if isinstance(exc, BaseExceptionGroup) and (inner := _known_error(exc)) is not None:
            return inner
    return None
