"""What the supervisor finds that it did not start in this run, and what it does with it.

- **Leftovers** of an earlier run (found by the marker in their environment, ``procs.marked``):
  at broker start, and again before each spawn, a leftover listening on the worker's port is
  *adopted* when it is healthy and runs this very command with this pin; otherwise it is
  stopped. A stranger on the port is reported and never doubled.
- **Strays** (``gpubroker workers stop --pid``): a GPU process per telemetry, or a marked
  worker that is no longer ours, is stopped; anything else is refused.

:class:`Leftovers` is part of :class:`~gpubroker.workers.supervisor.Supervisor` (its only
user), kept here so the supervisor's module holds the state machine and nothing else; it moves
a worker's state only as the supervisor does, under the same rules (see ``WorkerState``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
import psutil

from gpubroker.errors import WorkerError
from gpubroker.events import WireEvent, WorkerAdopted
from gpubroker.workers.procs import (
    MARKER,
    Telemetry,
    ancestors,
    cmdline,
    describe_pid,
    environ,
    is_alive,
    listening_on,
    marked,
    port_open,
    process,
    process_tree,
    stop_tree,
)
from gpubroker.workers.worker import Worker, WorkerState

log = logging.getLogger("gpubroker.workers.supervisor")


class Leftovers:
    """The supervisor's dealings with processes an earlier run left (mixed into it)."""

    if TYPE_CHECKING:  # what the supervisor provides
        workers: dict[str, Worker]
        telemetry: Telemetry | None
        _tg: anyio.abc.TaskGroup | None

        def _command(self, w: Worker) -> tuple[list[str], dict[str, str]]: ...
        async def _healthy(self, w: Worker) -> bool: ...
        def _emit(self, event: type[WireEvent], w: Worker, **fields: Any) -> None: ...
        async def _recover(
            self, w: Worker, proc: anyio.abc.Process | None, code: int | None
        ) -> None: ...

    async def _reconcile(self) -> None:
        """Broker start: each worker's leftovers from an earlier run are adopted (ours, healthy,
        same command and pin, listening) or stopped; a stranger on the port is reported."""
        for w in self.workers.values():
            w.argv, _ = self._command(w)
            found = set(await anyio.to_thread.run_sync(marked, w.name, w.spec.upstream))
            if not await port_open(w.host, w.port):
                for pid in sorted(found):
                    log.info("%s: stopping pid %d left by an earlier run", w.name, pid)
                    await self._kill_leftover(w, pid)
                continue
            owners = await anyio.to_thread.run_sync(listening_on, w.port) or []
            ours = [pid for pid in owners if pid in found]
            if ours:
                w.want_running = True
                error = await self._adopt_or_stop(w, ours[0], found)
                if error not in (None, "adopted"):
                    w.error = error
                if w.state is not WorkerState.READY:
                    w.want_running = False
                continue
            for pid in sorted(found):
                await self._kill_leftover(w, pid)
            who = await anyio.to_thread.run_sync(describe_pid, owners[0]) if owners else "?"
            w.error = f"port {w.port} is taken by {who}, which gpubroker did not start"
            log.warning("%s: %s; it will not be started while that lasts", w.name, w.error)

    async def _claim_port(self, w: Worker) -> str | None:
        """Before spawning: None when the port is free, "adopted" when our own leftover there
        was taken over, else why we refuse to start a second one."""
        if not await port_open(w.host, w.port):
            return None
        owners = await anyio.to_thread.run_sync(listening_on, w.port)
        if not owners:
            return (
                f"port {w.port} is already taken by a process gpubroker cannot identify; "
                f"refusing to start a second {w.name}"
            )
        found = set(await anyio.to_thread.run_sync(marked, w.name, w.spec.upstream))
        ours = [pid for pid in owners if pid in found]
        if not ours:
            who = await anyio.to_thread.run_sync(describe_pid, owners[0])
            return (
                f"port {w.port} is already taken by {who}, which gpubroker did not start; "
                f"refusing to start a second {w.name} (stop it with `gpubroker workers stop "
                f"--pid {owners[0]}` or point upstream elsewhere)"
            )
        return await self._adopt_or_stop(w, ours[0], found)

    async def _adopt_or_stop(self, w: Worker, listener: int, found: set[int]) -> str | None:
        """Our own worker from an earlier run is listening: adopt it when it is healthy and runs
        this very command with this pin; otherwise stop it. Other leftovers are stopped."""
        leader = listener
        with contextlib.suppress(ProcessLookupError, PermissionError):
            pgid = os.getpgid(listener)
            if pgid in found:
                leader = pgid
        proc = await anyio.to_thread.run_sync(process, leader)
        env = environ(proc) if proc else {}
        argv = await anyio.to_thread.run_sync(cmdline, leader)
        same = argv == w.argv and env.get("CUDA_VISIBLE_DEVICES") == ",".join(w.gpu_ids)
        if same and await self._healthy(w):
            w.proc, w.pid, w.adopted = None, leader, True
            try:
                w.started_at = proc.create_time() if proc else time.time()
            except psutil.Error:
                w.started_at = time.time()
            w.ready_at = time.time()
            w.state = WorkerState.READY
            w.want_running = True
            w.log.add(
                f"[gpubroker] adopted pid {leader} from an earlier run (its output before now "
                "was not captured, nor is it from here on)"
            )
            log.info("%s: adopted pid %d from an earlier run", w.name, leader)
            self._emit(WorkerAdopted, w, pid=leader)
            assert self._tg is not None
            self._tg.start_soon(self._monitor_adopted, w, leader)
            tree = await anyio.to_thread.run_sync(process_tree, leader)
            for other in found - {p.pid for p in tree}:
                await self._kill_leftover(w, other)
            return "adopted"
        why = "it does not answer its health check" if same else "its command or GPU pin changed"
        log.info("%s: stopping pid %d left by an earlier run (%s)", w.name, leader, why)
        w.log.add(f"[gpubroker] stopping pid {leader} left by an earlier run: {why}")
        for pid in sorted(found):
            await self._kill_leftover(w, pid)
        if await port_open(w.host, w.port):
            return f"port {w.port} is still taken after stopping the earlier run's {w.name}"
        return None

    async def _kill_leftover(self, w: Worker, pid: int) -> None:
        with anyio.CancelScope(shield=True):
            await stop_tree(pid, w.spec.stop_timeout, telemetry=self.telemetry)

    async def _monitor_adopted(self, w: Worker, pid: int) -> None:
        p = await anyio.to_thread.run_sync(process, pid)
        while p is not None and await anyio.to_thread.run_sync(is_alive, p):
            await anyio.sleep(0.5)
            if w.pid != pid or not w.adopted:
                return
        if w.pid == pid and w.adopted and w.state is WorkerState.READY:
            await self._recover(w, None, None)


async def stop_stray(pid: int, grace: float, *, telemetry: Telemetry | None) -> dict[str, Any]:
    """Stop ``pid`` when it is a GPU process (per telemetry) or a marked gpubroker worker."""
    target = await anyio.to_thread.run_sync(process, pid)
    if target is None or not await anyio.to_thread.run_sync(is_alive, target):
        raise WorkerError(f"no process with pid {pid}")
    if pid in await anyio.to_thread.run_sync(ancestors):
        raise WorkerError(f"pid {pid} is gpubroker itself (or its parent); not stopping it")
    snapshot = telemetry() if telemetry is not None else None
    on_gpu = snapshot is not None and any(p.pid == pid for g in snapshot.gpus for p in g.processes)
    is_marked = MARKER in await anyio.to_thread.run_sync(environ, target)
    if not (on_gpu or is_marked):
        who = await anyio.to_thread.run_sync(describe_pid, pid)
        raise WorkerError(
            f"{who} is neither a GPU process (per telemetry) nor a gpubroker worker; "
            "not stopping it"
        )
    report = await stop_tree(pid, grace, telemetry=telemetry)
    return {"stopped": True, "worker": None, **report}
