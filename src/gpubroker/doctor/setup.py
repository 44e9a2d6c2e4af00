"""The config itself: what loads yet will not behave as meant, and managed workers' commands.

What the loader refuses (a ``holdTime`` not shorter than ``queueTimeout``, an upstream that loops
through the broker...) never gets here: :func:`~gpubroker.doctor.run.diagnose` reports it as the
one error. The notes the loader already writes for ``serve`` (``residency_notes``) are reused,
not restated.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anyio.to_thread

from gpubroker.config.model import BackendConfig, Config
from gpubroker.config.rules import residency_notes
from gpubroker.config.units import format_duration
from gpubroker.doctor.findings import Finding
from gpubroker.workers.worker import Worker


def config_warnings(cfg: Config) -> list[Finding]:
    out: list[Finding] = []
    if cfg.effective_hold_time < cfg.hold_time:
        out.append(
            Finding(
                "config",
                "warning",
                f"holdTime ({format_duration(cfg.hold_time)}) is more than half of queueTimeout "
                f"({format_duration(cfg.queue_timeout)}), so it is capped at "
                f"{format_duration(cfg.effective_hold_time)}: a waiter's turn must come before "
                "its timeout",
                f"lower holdTime to {format_duration(cfg.effective_hold_time)} or less, or "
                f"raise queueTimeout to {format_duration(cfg.hold_time * 2)} or more",
            )
        )
    for b in cfg.backends:
        if b.start_timeout > cfg.queue_timeout:
            out.append(
                Finding(
                    "config",
                    "warning",
                    f"{b.name}'s startTimeout ({format_duration(b.start_timeout)}) is longer than "
                    f"queueTimeout ({format_duration(cfg.queue_timeout)}): a request that waits "
                    f"for {b.name} to load gets 503 before the load may end",
                    f"raise queueTimeout to {format_duration(b.start_timeout)} or more, or "
                    f"lower {b.name}'s startTimeout",
                    b.name,
                )
            )
    if cfg.policy == "budget" and cfg.telemetry == "none":
        sized = cfg.gpus != "auto" and any(g.memory is not None for g in cfg.gpus)
        if not sized:
            out.append(
                Finding(
                    "config",
                    "warning",
                    "policy: budget with `telemetry: none` and no `gpus:` memory: no GPU's "
                    "capacity is known, so budget behaves as exclusive",
                    "declare `gpus: [{id: 0, memory: 24GiB}]`, or let telemetry read it",
                )
            )
    out += [Finding("config", "info", note.removeprefix("note: ")) for note in residency_notes(cfg)]
    return out


def find_command(backend: BackendConfig) -> Finding:
    """Whether a managed worker's program exists, where ``serve`` would start it. Blocking."""
    argv, env = Worker(backend).command(None)
    program = argv[0]
    cwd = Path(backend.cwd) if backend.cwd else Path.cwd()
    if backend.cwd and not cwd.is_dir():
        return Finding(
            "command",
            "error",
            f"{backend.name}'s cwd {backend.cwd} is not a directory: its worker cannot start",
            "create it, or correct `cwd:`",
            backend.name,
        )
    if os.sep in program or (os.altsep and os.altsep in program):
        path = cwd / program
        found = str(path) if path.is_file() and os.access(path, os.X_OK) else None
    else:
        found = shutil.which(program, path=env.get("PATH"))
    if found is None:
        return Finding(
            "command",
            "error",
            f"{backend.name}'s command {program!r} is not found"
            + ("" if os.sep in program else " on PATH")
            + ": its worker cannot start",
            f"install {os.path.basename(program)}, or give its full path in `command:`",
            backend.name,
            {"program": program},
        )
    return Finding(
        "command",
        "ok",
        f"{backend.name}'s command {program!r} is {found}",
        backend=backend.name,
        facts={"program": program, "path": found},
    )


async def commands(cfg: Config) -> list[Finding]:
    out = []
    for b in cfg.backends:
        if b.command:
            out.append(await anyio.to_thread.run_sync(find_command, b, abandon_on_cancel=True))
    return out
