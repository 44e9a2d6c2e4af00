"""How a managed worker's process is started: tied to its broker, or detached.

Tied (the default): through the parent-death wrapper (``deathsig.py``) with its output on a
pipe the supervisor reads into the worker's log. Detached (``detach: true``): a plain
``subprocess.Popen`` from a thread, its output appended to its log file, so nothing of the
broker's (a pipe, an event loop's subprocess transport, which kills its child as it closes)
ties it to the broker's life. Either way in its own session, so a stop reaches its whole group.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import anyio
import anyio.to_thread

from gpubroker.config.model import BackendConfig
from gpubroker.workers import deathsig
from gpubroker.workers.procs import Child, DetachedChild


async def spawn(
    spec: BackendConfig, argv: list[str], env: dict[str, str], log_path: Path | None
) -> tuple[Child, bool]:
    """Start ``argv``; the process, and whether it is tied to this broker (dies with it).
    ``log_path``: where a detached worker's output goes (None: nowhere)."""
    if not spec.detach:
        proc = await anyio.open_process(
            deathsig.wrap(argv, spec.stop_timeout),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=spec.cwd,
            env=env,
            start_new_session=True,  # its own process group: a stop reaches every child
        )
        return proc, deathsig.SUPPORTED

    def start() -> subprocess.Popen[bytes]:
        sink = None
        if log_path is not None:
            log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            sink = log_path.open("ab")
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=sink if sink is not None else subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                cwd=spec.cwd,
                env=env,
                start_new_session=True,
            )
        finally:
            if sink is not None:
                sink.close()

    return DetachedChild(await anyio.to_thread.run_sync(start)), False


def not_runnable(program: str, env: dict[str, str], cwd: str | None) -> str | None:
    """Why ``program`` cannot be run, found before spawning (the wrapper could only exit 127),
    or None."""
    if os.sep in program:
        path = os.path.join(cwd or ".", program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return None
        why = "No such file or directory" if not os.path.exists(path) else "Permission denied"
        return f"cannot run {program!r}: {why}"
    if shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        return f"cannot run {program!r}: not found on PATH"
    return None
