"""``gpubroker doctor``: every check of :mod:`gpubroker.doctor`, printed, with its exit code."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from gpubroker.cli.common import ConfigOption

MARK = {"error": "error", "warning": "warn ", "info": "info ", "ok": "ok   "}
COLOUR = {"error": "red", "warning": "yellow", "info": "blue", "ok": "green"}


def doctor(
    config: ConfigOption = None,
    json_: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the findings as a JSON array: check, severity, backend, message, fix, "
            "facts.",
        ),
    ] = False,
) -> None:
    """Check the set-up and say, for each finding, what to change.

    NVML and the driver; each upstream (reachable, what it is, its version, Ollama's and
    vLLM's settings against the broker's, ComfyUI's device); the broker's ports; config
    warnings; managed workers' commands. Exit code 0 when nothing is an error, 1 otherwise.
    """
    import anyio

    from gpubroker.doctor import diagnose, exit_code
    from gpubroker.doctor.run import load

    cfg, findings = load(config)
    if cfg is not None and cfg.backends:

        def slow(labels: list[str]) -> None:
            typer.echo(f"  still checking: {', '.join(labels)}…", err=True)

        findings += anyio.run(lambda: diagnose(cfg, on_slow=slow))
    if json_:
        typer.echo(json.dumps([f.to_json() for f in findings], indent=2))
    else:
        for f in findings:
            where = f"{f.backend}: " if f.backend else ""
            mark = typer.style(MARK[f.severity], fg=COLOUR[f.severity], bold=True)
            typer.echo(f"{mark} [{f.check}] {where}{f.message}")
            if f.fix:
                typer.echo(f"        fix: {f.fix}")
        counts = {s: sum(f.severity == s for f in findings) for s in MARK}
        plural = {"error": "errors", "warning": "warnings"}
        typer.echo(", ".join(f"{n} {plural.get(s, s) if n != 1 else s}" for s, n in counts.items()))
    raise typer.Exit(exit_code(findings))
