"""The ``gpubroker`` command tree. Commands are thin: they parse, call the library, print.

Heavy imports (httpx, NVML, the broker) happen inside the commands, so ``--help`` and shell
completion stay fast and never touch a GPU or load plugins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpubroker.cli import admin, doctor, serve, workers
from gpubroker.cli.common import ConfigOption, fail, friendly, reflowed
from gpubroker.errors import GPUBrokerError

if TYPE_CHECKING:
    from gpubroker.plugins.manager import Provided

app = typer.Typer(
    name="gpubroker",
    help="One GPU, many inference services, no OOMs: a VRAM-scheduling proxy for Ollama, "
    "ComfyUI, vLLM, llama.cpp and friends.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from gpubroker import __version__

        typer.echo(f"gpubroker {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_version, is_eager=True
        ),
    ] = False,
) -> None:
    """One GPU, many inference services, no OOMs."""


@app.command()
@friendly
def init(
    path: Annotated[
        Path, typer.Option("--path", "-o", help="Where to write the config.", dir_okay=False)
    ] = Path("gpubroker.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    no_detect: Annotated[
        bool, typer.Option("--no-detect", help="Skip probing GPUs and local services.")
    ] = False,
) -> None:
    """Write a commented gpubroker.yaml, pre-filled with the GPUs and services found here."""
    import anyio

    from gpubroker.cli.detect import find_gpus, find_services
    from gpubroker.cli.initfile import build_document, render
    from gpubroker.config.load import load_config_file

    if path.exists() and not force:
        typer.echo(f"gpubroker: {path} already exists; use --force to overwrite it.", err=True)
        raise typer.Exit(2)

    async def detect() -> tuple:
        if no_detect:
            return [], (), "detection skipped"
        typer.echo("Looking for GPUs and for services on their usual ports…", err=True)
        services = await find_services()
        gpus, notice = await find_gpus()
        return services, gpus, notice

    services, gpus, notice = anyio.run(detect)
    for gpu in gpus:
        typer.echo(f"  GPU {gpu.index}: {gpu.name} ({gpu.uuid})", err=True)
    if notice and not no_detect:
        typer.echo(f"  GPUs: {notice}; writing `gpus: auto`.", err=True)
    for service in services:
        typer.echo(f"  {service.kind} at {service.upstream} ({service.evidence})", err=True)
    if not services and not no_detect:
        typer.echo("  no services answered; writing Ollama and ComfyUI defaults.", err=True)
    text = render(build_document(services, gpus, notice))
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        typer.echo(f"gpubroker: cannot write {path}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    load_config_file(path)  # what we write must load: fail loudly here, not at `serve`
    typer.echo(f"Wrote {path}. Next: gpubroker serve --config {path}")


@app.command("plugins")
@friendly
def plugins_(
    config: ConfigOption = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every unload strategy, classifier and telemetry source, and who provides it."""
    import json as jsonlib

    from gpubroker.config.load import resolve_config
    from gpubroker.errors import ConfigError
    from gpubroker.plugins.manager import create_plugins

    disabled: tuple[str, ...] = ()
    if config is not None:
        disabled = resolve_config(config).disable_plugins
    else:
        with contextlib.suppress(ConfigError):  # no config is fine: list what is installed
            disabled = resolve_config(None).disable_plugins
    plugins = create_plugins(disabled)
    kinds: dict[str, Mapping[str, Provided[Any]]] = {
        "strategies": plugins.strategies,
        "classifiers": plugins.classifiers,
        "telemetry": plugins.telemetry,
    }
    if json_:
        out: dict[str, Any] = {
            kind: [
                {
                    "name": p.name,
                    "plugin": p.plugin,
                    "package": p.package,
                    "version": p.version,
                    "description": p.description,
                }
                for p in found.values()
            ]
            for kind, found in kinds.items()
        }
        out["disabled"] = list(plugins.disabled)
        typer.echo(jsonlib.dumps(out, indent=2))
        return
    width = max(
        (len(f"{p.package} {p.version}") for f in kinds.values() for p in f.values()), default=0
    )
    for kind, found in kinds.items():
        typer.echo(f"{kind}:")
        for p in found.values():
            provider = f"{p.package} {p.version}"
            typer.echo(f"  {p.name:<10} {provider:<{width}}  {p.description}")
    if plugins.disabled:
        typer.echo(f"disabled: {', '.join(plugins.disabled)}")


for command in (
    serve.serve,
    serve.demo,
    admin.status,
    admin.unload,
    admin.swap,
    admin.reload,
    doctor.doctor,
):
    app.command(help=reflowed(command.__doc__))(friendly(command))
app.add_typer(workers.app)


def main() -> None:
    """Console entry point: known errors become one line and an exit code, never a traceback."""
    try:
        app(standalone_mode=True)
    except GPUBrokerError as exc:
        fail(exc)


if __name__ == "__main__":  # pragma: no cover
    main()
