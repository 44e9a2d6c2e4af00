"""A managed worker's processes, as psutil sees them: find them, recognise them, stop them.

The plain functions block (psutil walks ``/proc``): call them through ``anyio.to_thread``.
:func:`port_open` and :func:`stop_tree` are coroutines and safe on the event loop.

Every spawned worker carries ``GPUBROKER_WORKER=<name>`` and ``GPUBROKER_WORKER_UPSTREAM=<url>``
in its environment (:data:`MARKER`, :data:`MARKER_UPSTREAM`): that is how a later broker
recognises its own leftovers after a crash (:func:`marked`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import anyio
import anyio.to_thread
import psutil

from gpubroker.telemetry.base import TelemetrySnapshot

log = logging.getLogger("gpubroker.workers.supervisor")

MARKER = "GPUBROKER_WORKER"
MARKER_UPSTREAM = "GPUBROKER_WORKER_UPSTREAM"
POLL = 0.05  # while waiting for processes to go and ports to close
VRAM_POLL = 0.25  # while waiting for a telemetry sample that shows the memory back
AFTER_GRACE = 10.0  # a stop's time after its grace for SIGKILL, reaping and its checks

Telemetry = Callable[[], TelemetrySnapshot]
"""The latest shared telemetry snapshot (the monitor's); never triggers a driver call."""

DETACHED_POLL = 0.1  # seconds between looks at a detached child's exit


class Child(Protocol):
    """A worker process we spawned: anyio's ``Process``, or :class:`DetachedChild`."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    async def wait(self) -> int: ...


class DetachedChild:
    """A ``detach: true`` worker: a plain ``subprocess.Popen`` (spawned in a thread), which,
    unlike an event loop's subprocess transport, nothing kills when the broker's loop closes;
    its exit is polled (``waitpid`` with ``WNOHANG``, which never blocks)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    async def wait(self) -> int:
        while (code := self.popen.poll()) is None:
            await anyio.sleep(DETACHED_POLL)
        return code


def process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (as far as they can be seen)."""
    root = process(pid)
    if root is None:
        return []
    try:
        return [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return [root]


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except (ProcessLookupError, PermissionError):
        return False


def _group(pgid: int) -> list[psutil.Process]:
    """Every live process whose process group is ``pgid`` (its leader may be gone already)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p)
        except (ProcessLookupError, PermissionError):
            continue
    return out


def family(pid: int) -> tuple[list[psutil.Process], bool]:
    """The process, its descendants and its process group (when it leads one); and whether
    it does (so the group can be signalled as one)."""
    members = process_tree(pid)
    grouped = _group(pid)
    seen = {p.pid for p in members}
    members += [p for p in grouped if p.pid not in seen]
    return members, bool(grouped) or _leads_group(pid)


def signal_family(pid: int, members: Iterable[psutil.Process], sig: int, group: bool) -> None:
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
    for p in members:  # descendants that left the group (setsid) get it one by one
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            if not group or os.getpgid(p.pid) != pid:
                p.send_signal(sig)


def listening_on(port: int) -> list[int] | None:
    """PIDs listening on ``port`` (None when the system will not say)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    return sorted(
        {
            c.pid
            for c in conns
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        }
    )


def environ(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
        return {}


def cmdline(pid: int) -> list[str]:
    p = process(pid)
    if p is None:
        return []
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def marked(name: str, upstream: str) -> list[int]:
    """PIDs of processes carrying this worker's marker (leftovers of an earlier broker)."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter():
        if p.pid == me:
            continue
        env = environ(p)
        if env.get(MARKER) == name and env.get(MARKER_UPSTREAM) == upstream and is_alive(p):
            found.append(p.pid)
    return found


def describe_pid(pid: int) -> str:
    """``pid 42 (python3)``: its name only, never its arguments, which may hold secrets (this
    line can reach the open ``/api/workers``)."""
    p = process(pid)
    try:
        name = p.name() if p is not None else ""
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        name = ""
    return f"pid {pid} ({name})" if name else f"pid {pid}"


def ancestors() -> set[int]:
    out = set()
    p = process(os.getpid())
    while p is not None:
        out.add(p.pid)
        try:
            p = p.parent()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            break
    return out


async def port_open(host: str, port: int) -> bool:
    try:
        with anyio.fail_after(1.0):
            stream = await anyio.connect_tcp(host, port)
    except (OSError, TimeoutError):
        return False
    await stream.aclose()
    return True


# --- stopping a tree ---------------------------------------------------------------------------


async def stop_tree(
    pid: int,
    grace: float,
    *,
    deadline: float | None = None,
    child: Child | None = None,
    address: tuple[str, int] | None = None,
    telemetry: Telemetry | None = None,
) -> dict[str, Any]:
    """SIGTERM ``pid``'s process group and tree, SIGKILL what is left after ``grace``, then
    confirm that every process is gone, ``address`` no longer answers and (with ``telemetry``)
    none of the PIDs holds GPU memory.

    Every wait shares one ``deadline`` (in :func:`anyio.current_time`'s clock; by default
    ``grace + AFTER_GRACE`` from now): SIGTERM gets ``grace`` of it at most, and the reaping and
    the checks what is left, in that order. The signals are always sent; only the waiting is
    bounded. A check the deadline cut short is reported as not confirmed: ``False`` when it
    still failed at the deadline, ``None`` when there was no time (or no means) to tell.
    ``child`` is our own ``Process`` for ``pid``, reaped by the event loop, never by psutil.
    """
    started = anyio.current_time()
    if deadline is None:
        deadline = started + grace + AFTER_GRACE
    members, group = await anyio.to_thread.run_sync(family, pid)
    pids = [p.pid for p in members] or [pid]
    await anyio.to_thread.run_sync(signal_family, pid, members, signal.SIGTERM, group)
    how = "SIGTERM"
    if not await _gone(members, child, min(started + grace, deadline)):
        how = "SIGKILL"
        log.warning("pid %d ignored SIGTERM for %.1fs: SIGKILL", pid, grace)
        await anyio.to_thread.run_sync(signal_family, pid, members, signal.SIGKILL, group)
        await _gone(members, child, deadline)
    if group:  # stragglers of the group that left the tree: they had their TERM already
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    survivors = [p.pid for p in members if await anyio.to_thread.run_sync(is_alive, p)]
    port_closed = None if address is None else await _port_closed(*address, deadline)
    vram_freed = None if telemetry is None else await _vram_freed(set(pids), telemetry, deadline)
    return {
        "pid": pid,
        "pids": pids,
        "signal": how,
        "ms": round((anyio.current_time() - started) * 1000, 1),
        "survivors": survivors,
        "portClosed": port_closed,
        "vramFreed": vram_freed,
    }


async def _gone(members: list[psutil.Process], child: Child | None, deadline: float) -> bool:
    """Wait until ``deadline`` at most for every process of ``members`` to be gone. Our own
    child is reaped by the event loop (never by psutil, which would steal its exit status)."""
    others = [p for p in members if child is None or p.pid != child.pid]
    with anyio.CancelScope(deadline=deadline):
        while True:
            if child is not None and child.returncode is None:
                await anyio.sleep(POLL)
                continue
            alive = [p for p in others if await anyio.to_thread.run_sync(is_alive, p)]
            if not alive:
                return True
            await anyio.sleep(POLL)
    return False


async def _port_closed(host: str, port: int, deadline: float) -> bool | None:
    closed: bool | None = None
    with anyio.CancelScope(deadline=deadline):
        while True:
            closed = not await port_open(host, port)
            if closed:
                break
            await anyio.sleep(POLL)
    return closed


async def _vram_freed(pids: set[int], telemetry: Telemetry, deadline: float) -> bool | None:
    """Wait for a sample taken after now in which none of ``pids`` holds GPU memory; None
    without GPUs to tell, or when no such sample came before ``deadline``."""
    since = time.time()
    freed: bool | None = None
    with anyio.CancelScope(deadline=deadline):
        while True:
            snapshot = telemetry()
            if not snapshot.gpus:
                return None
            if snapshot.taken_at >= since and not snapshot.error:
                freed = not any(p.pid in pids for g in snapshot.gpus for p in g.processes)
                if freed:
                    return True
            await anyio.sleep(VRAM_POLL)
    return freed
