"""The state file's ``workers`` section: which managed workers this broker runs, so that after a
crash of the broker the next start finds its own (even one still loading, not yet listening) and
adopts or stops it (``adopt.py``).

One record per worker with a process: its PID and the process's start time (psutil's
``create_time``, so a PID the OS gave to another process since is no match), the command it
runs, the GPU pin, the upstream and port, and whether it is detached (``detach: true``) or dies
with its broker (``deathsig.py``). A record that does not parse is dropped with one log line;
one whose process is gone, or is another process now, is simply not found.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from gpubroker.statefile import is_time
from gpubroker.workers.procs import is_alive, process

log = logging.getLogger("gpubroker.workers.supervisor")

SAME_START = 0.5  # seconds: psutil's create_time of one process, read twice, differs less


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A managed worker's process as the state file keeps it."""

    pid: int
    started: float  # the process's create_time (psutil), wall clock
    argv: tuple[str, ...]
    gpu: str  # CUDA_VISIBLE_DEVICES it was started with
    upstream: str
    port: int
    detach: bool
    tied: bool  # started with the parent-death wrapper: it dies with the broker that started it

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "argv": list(self.argv)}


def parse_records(data: Any) -> dict[str, WorkerRecord]:
    """The records in a loaded ``workers`` section; a bad one is dropped, with one log line."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        log.warning("state file: the workers section is not an object; ignored")
        return {}
    out: dict[str, WorkerRecord] = {}
    for name, raw in data.items():
        try:
            out[str(name)] = _parse(raw)
        except (TypeError, ValueError) as exc:
            log.warning("state file: the record of worker %r is ignored (%s)", name, exc)
    return out


def _parse(raw: Any) -> WorkerRecord:
    if not isinstance(raw, Mapping):
        raise ValueError("not an object")
    pid, started, argv = raw.get("pid"), raw.get("started"), raw.get("argv")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        raise ValueError(f"pid {pid!r}")
    if not is_time(started):
        raise ValueError(f"started {started!r}")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv is not a list of strings")
    port = raw.get("port")
    if not isinstance(port, int) or isinstance(port, bool):
        raise ValueError(f"port {port!r}")
    return WorkerRecord(
        pid=pid,
        started=float(started),
        argv=tuple(argv),
        gpu=str(raw.get("gpu", "")),
        upstream=str(raw.get("upstream", "")),
        port=port,
        detach=bool(raw.get("detach", False)),
        tied=bool(raw.get("tied", False)),
    )


def start_time(pid: int) -> float | None:
    """The process's create_time, None when it is gone. Blocking (reads /proc)."""
    p = process(pid)
    if p is None:
        return None
    try:
        return float(p.create_time())
    except psutil.Error:
        return None


def still_running(record: WorkerRecord) -> bool:
    """Whether the recorded process is alive and is the one recorded (same start time), not
    another that was given its PID since. Blocking (reads /proc)."""
    p = process(record.pid)
    if p is None or not is_alive(p):
        return False
    try:
        return abs(p.create_time() - record.started) < SAME_START
    except psutil.Error:
        return False
