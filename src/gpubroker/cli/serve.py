"""``gpubroker serve`` and ``gpubroker demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from gpubroker.cli.common import ConfigOption
from gpubroker.logs import LogFormat, configure


def _logging(verbose: bool, log_format: LogFormat = "text") -> None:
    """Text lines for people, or one JSON object per line for log shippers (gpubroker.logs)."""
    configure(verbose=verbose, fmt=log_format)


def loop_options() -> dict[str, Any]:
    """anyio's asyncio options: uvloop when installed (the ``fast`` extra), ~1.3-2x less event
    loop CPU per proxied request than the stock loop."""
    import importlib.util

    return {"use_uvloop": importlib.util.find_spec("uvloop") is not None}


def serve(
    config: ConfigOption = None,
    check: Annotated[
        bool, typer.Option("--check", help="Validate the config, print it resolved, and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every decision.")] = False,
    watch_config: Annotated[
        bool,
        typer.Option(
            "--watch-config",
            help="Reload the config file when it changes (checked every second); SIGHUP and "
            "`gpubroker reload` reload it too.",
        ),
    ] = False,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            envvar="GPUBROKER_LOG_FORMAT",
            help="text (for people) or json (one object per line on stderr: time, level, "
            "logger, event, backend, requestId...).",
        ),
    ] = "text",
) -> None:
    """Run the broker: a proxy port per backend and the status port, until Ctrl-C or SIGTERM.

    SIGHUP (or `gpubroker reload`) re-reads the config file and applies what changed."""
    import json
    import signal

    import anyio

    from gpubroker.config.load import describe_config, resolve_config
    from gpubroker.plugins.manager import check_config_names, create_plugins
    from gpubroker.proxy.memory import settle_heap
    from gpubroker.runtime import run_broker

    cfg = resolve_config(config)
    if not cfg.backends:
        raise cfg.error("backends", "no backends to serve: add at least one (`gpubroker init`)")
    plugins = create_plugins(cfg.disable_plugins)
    check_config_names(cfg, plugins)
    if cfg.server == "uvicorn":
        from gpubroker.proxy.uvicorn_server import available

        missing = available()
        if missing is not None:
            raise cfg.error("server", missing)
    if check:
        typer.echo(describe_config(cfg))
        typer.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    _logging(verbose, log_format)
    typer.echo(describe_config(cfg), err=True)

    async def main() -> None:
        shutdown = anyio.Event()
        async with anyio.create_task_group() as tg:
            reload: list[Any] = []  # the broker's reload, once it serves

            async def on_signal() -> None:
                wanted = [signal.SIGINT, signal.SIGTERM]
                if hasattr(signal, "SIGHUP"):
                    wanted.append(signal.SIGHUP)
                with anyio.open_signal_receiver(*wanted) as signals:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if name == "SIGHUP":  # the reload logs what changed, or the error
                            if reload and not shutdown.is_set():
                                tg.start_soon(reload[0])
                            continue
                        typer.echo(
                            f"{name}: stopping; in-flight requests get up to "
                            f"{cfg.shutdown_grace:g}s to finish (again to force).",
                            err=True,
                        )
                        if shutdown.is_set():
                            tg.cancel_scope.cancel()
                            return
                        shutdown.set()

            tg.start_soon(on_signal)
            done = anyio.Event()

            async def broker(*, task_status: anyio.abc.TaskStatus[Any]) -> None:
                try:
                    await run_broker(cfg, plugins, shutdown, task_status=task_status)
                finally:
                    done.set()

            endpoints = await tg.start(broker)
            settle_heap()  # built and serving: what is alive now is never garbage
            reload.append(endpoints.reload)
            if watch_config and cfg.source in (None, "environment"):
                typer.echo("--watch-config: no config file to watch (env-var mode)", err=True)
            elif watch_config:
                from gpubroker.runtime.watch import watch_config as watch

                tg.start_soon(watch, Path(str(cfg.source)), endpoints.reload)
            typer.echo(f"gpubroker serving; status at {endpoints.status_url}", err=True)
            await done.wait()  # run_broker returns once in-flight responses have drained
            tg.cancel_scope.cancel()

    anyio.run(main, backend_options=loop_options())
    typer.echo("gpubroker stopped.", err=True)


def demo(
    keep: Annotated[
        bool,
        typer.Option(
            "--keep",
            help="Keep serving after the workload, with a request every few seconds, and "
            "print the dashboard's URL; until Ctrl-C.",
        ),
    ] = False,
    requests: Annotated[
        int, typer.Option("--requests", "-n", min=3, max=500, help="Requests in the workload.")
    ] = 24,
) -> None:
    """Run simulated Ollama, ComfyUI and vLLM on a simulated 24 GiB GPU behind a real broker."""
    from gpubroker.cli.demo import run_demo

    run_demo(keep=keep, requests=requests)
