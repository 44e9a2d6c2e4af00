"""Real processes for the tests: the fake worker's command, free ports, and waiting for PIDs."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import Any

import anyio
import psutil

from gpubroker.telemetry.base import GpuProcess, GpuSample, TelemetrySnapshot

FAKE = [sys.executable, "-m", "gpubroker.sim.fake_worker", "--port", "{port}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gpu_holding(*pids: int, index: int = 0) -> TelemetrySnapshot:
    """A fresh sample of one GPU on which ``pids`` hold 1 GiB each."""
    procs = tuple(GpuProcess(pid, 2**30) for pid in pids)
    gpu = GpuSample(uuid=f"GPU-{index}", index=index, name="g", processes=procs)
    return TelemetrySnapshot(taken_at=time.time(), gpus=(gpu,))


def alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def all_gone(pids: list[int], limit: float = 5.0) -> bool:
    with anyio.move_on_after(limit):
        while any(alive(p) for p in pids):
            await anyio.sleep(0.05)
        return True
    return False


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def popen(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    """Start a process (fork and exec: quick enough to do on the event loop in a test)."""
    return subprocess.Popen(argv, **kw)
