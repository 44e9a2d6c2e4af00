"""``gpubroker serve`` and ``gpubroker demo``."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import ConfigOption, not_yet


def serve(
    config: ConfigOption = None,
    check: Annotated[
        bool, typer.Option("--check", help="Validate the config, print it resolved, and exit.")
    ] = False,
) -> None:
    """Run the broker: a proxy port per backend and the status port, until Ctrl-C or SIGTERM."""
    import json

    from ..config import describe_config, resolve_config
    from ..plugins import check_config_names, create_plugins

    cfg = resolve_config(config)
    plugins = create_plugins(cfg.disable_plugins)
    check_config_names(cfg, plugins)
    if check:
        typer.echo(describe_config(cfg))
        typer.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    not_yet("`gpubroker serve`", "the broker comes with the broker issue")


def demo() -> None:
    """Run simulated Ollama, ComfyUI and vLLM on a simulated GPU behind a real broker."""
    not_yet("`gpubroker demo`", "the broker comes with the broker issue")
