"""What the supervisor finds that it did not start in this run, and what it does with it.

- **Leftovers** of an earlier run: the processes carrying this worker's marker in their
  environment (``procs.marked``), and the one the state file recorded (``records.py``: its PID,
  with the same start time, so never another process that was given the PID since). They are
  looked for at broker start, and again before each spawn. :func:`judge` is the one rule for
  what becomes of one; a leftover is *adopted* when it runs this very command with this pin and
  answers its health check; *waited for* when it does not answer yet but started less than
  ``startTimeout`` ago (a worker still loading its model when the broker crashed: it is
  ``starting`` until it answers, then adopted, or stopped at the deadline); *stopped* otherwise:
  its command or pin changed, it was started to die with its broker (``deathsig.py``) and that
  broker is gone, or it is not healthy past ``startTimeout``. Whatever else of the worker's an
  earlier run left is stopped too. A stranger on the port is reported and never doubled.
- **Strays** (``gpubroker workers stop --pid``): a GPU process per telemetry, or a marked
  worker that is no longer ours, is stopped; anything else is refused.

So after a crash of the broker nothing of its workers is left holding VRAM with nobody owning
it, and no second copy starts next to a live one.

:class:`Leftovers` is part of :class:`~gpubroker.workers.supervisor.Supervisor` (its only
user), kept here so the supervisor's module holds the state machine and nothing else; it moves
a worker's state only as the supervisor does, under the same rules (see ``WorkerState``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.abc
import anyio.to_thread

from gpubroker.errors import WorkerError
from gpubroker.events import WireEvent, WorkerAdopted, WorkerStarting
from gpubroker.statefile import Section
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
from gpubroker.workers.records import WorkerRecord, parse_records, start_time, still_running
from gpubroker.workers.worker import Worker, WorkerState

log = logging.getLogger("gpubroker.workers.supervisor")

LEFTOVER_POLL = 0.25  # seconds between health checks of a leftover still loading

Verdict = Literal["adopt", "wait", "stop"]


@dataclass(frozen=True, slots=True)
class Leftover:
    """What is known of the leader of a worker's leftover processes."""

    pid: int
    same_command: bool  # this command and this GPU pin
    listening: bool  # it (or its tree) listens on the worker's port
    healthy: bool  # and answers the health check
    age: float  # seconds since it started
    doomed: bool  # started to die with its broker (the parent-death wrapper), which is gone


def judge(left: Leftover, start_timeout: float, *, may_wait: bool) -> tuple[Verdict, str]:
    """The one rule for an earlier run's worker: adopt, wait for it, or stop it (and why)."""
    if not left.same_command:
        return "stop", "its command or GPU pin changed"
    if left.doomed:
        return "stop", "it was started to die with its broker, which is gone"
    if left.listening and left.healthy:
        return "adopt", "healthy, same command and pin"
    if may_wait and left.age < start_timeout:
        return "wait", "still starting (not answering yet)"
    if left.listening:
        return "stop", "it does not answer its health check"
    return "stop", f"not listening after startTimeout {start_timeout:g}s"


def _leader(found: set[int], recorded: int | None, owners: list[int]) -> int:
    """The process that stands for the leftovers: the recorded one, else the leader of the
    group that listens, else a group leader among them."""
    if recorded is not None and recorded in found:
        return recorded
    for pid in owners:
        if pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                pgid = os.getpgid(pid)
                if pgid in found:
                    return pgid
            return pid
    leaders = []
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                leaders.append(pid)
    return min(leaders or found)


class Leftovers:
    """The supervisor's dealings with processes an earlier run left (mixed into it)."""

    if TYPE_CHECKING:  # what the supervisor provides
        workers: dict[str, Worker]
        telemetry: Telemetry | None
        records: dict[str, WorkerRecord]
        _tg: anyio.abc.TaskGroup | None

        def _command(self, w: Worker) -> tuple[list[str], dict[str, str]]: ...
        async def _healthy(self, w: Worker) -> bool: ...
        def _emit(self, event: type[WireEvent], w: Worker, **fields: Any) -> None: ...

        _section: Section | None
        log_dir: Path | None
        _me: tuple[int, float | None]

        async def _recover(
            self, w: Worker, proc: anyio.abc.Process | None, code: int | None
        ) -> None: ...

    # --- the state file's records (records.py): what the next start will find --------------

    def _earlier_records(self, loaded: Any) -> dict[str, WorkerRecord]:
        """The records an earlier run left; none while the broker that wrote them still runs
        (two brokers on one state directory: its workers are not ours to judge)."""
        if not isinstance(loaded, dict):
            return {}
        owner = loaded.get("broker")
        if isinstance(owner, dict) and owner.get("pid") not in (None, os.getpid()):
            pid, started = owner.get("pid"), owner.get("started")
            if isinstance(pid, int) and isinstance(started, int | float):
                probe = WorkerRecord(pid, float(started), ("?",), "", "", 0, False, False)
                if still_running(probe):
                    log.warning(
                        "state file: the broker that wrote it (pid %d) still runs; its workers "
                        "are left to it",
                        pid,
                    )
                    return {}
        return parse_records(loaded.get("workers"))

    def _records_json(self) -> dict[str, Any]:
        pid, started = self._me
        return {
            "broker": {"pid": pid, "started": started},
            "workers": {name: r.to_json() for name, r in sorted(self.records.items())},
        }

    def _remember(self, w: Worker) -> None:
        """``w``'s process changed (spawned, adopted, gone): its record follows."""
        if w.pid is None:
            self.records.pop(w.name, None)
        else:
            self.records[w.name] = WorkerRecord(
                pid=w.pid,
                started=w.created if w.created is not None else w.started_at or time.time(),
                argv=tuple(w.argv),
                gpu=",".join(w.gpu_ids),
                upstream=w.spec.upstream,
                port=w.port,
                detach=w.spec.detach,
                tied=w.tied,
            )
        if self._section is not None:
            self._section.changed(urgent=True)

    async def _stop_unknown(self) -> None:
        """An earlier run's worker whose backend is gone from the config (or is no longer
        managed) holds VRAM nobody owns: stop it."""
        for name, record in list(self.records.items()):
            if name in self.workers:
                continue
            del self.records[name]
            if await anyio.to_thread.run_sync(still_running, record):
                log.info("stopping pid %d: worker %r of an earlier run is no longer configured",
                         record.pid, name)  # fmt: skip
                with anyio.CancelScope(shield=True):
                    await stop_tree(record.pid, 10.0, telemetry=self.telemetry)
        if self._section is not None:
            self._section.changed()

    def _log_path(self, w: Worker) -> Path | None:
        """Where a detached worker writes its output: ``logFile``, else the state directory."""
        if w.spec.log_file:
            return Path(w.spec.log_file)
        return self.log_dir / f"{w.name}.log" if self.log_dir is not None else None

    def _follow_log(self, w: Worker) -> None:
        """A detached worker's output is its log file: follow it into the ring buffer."""
        path = self._log_path(w) if w.spec.detach else None
        if path is not None and w.pid is not None and self._tg is not None:
            self._tg.start_soon(w.tail_file, str(path), w.pid)

    async def _reconcile(self) -> None:
        """Broker start: each worker's leftovers from an earlier run are adopted, waited for
        or stopped (:func:`judge`); a stranger on the port is reported."""
        for w in self.workers.values():
            w.argv, _ = self._command(w)
            found, record = await self._leftovers(w)
            if found:
                error = await self._settle(w, found, record, may_wait=True)
                if error not in (None, "adopted"):
                    w.error = error
            self._remember(w)  # the earlier run's record gives way to what is true now
            if found:
                continue
            if not await port_open(w.host, w.port):
                continue
            owners = await anyio.to_thread.run_sync(listening_on, w.port) or []
            who = await anyio.to_thread.run_sync(describe_pid, owners[0]) if owners else "?"
            w.error = f"port {w.port} is taken by {who}, which gpubroker did not start"
            log.warning("%s: %s; it will not be started while that lasts", w.name, w.error)

    async def _leftovers(self, w: Worker) -> tuple[set[int], WorkerRecord | None]:
        """``w``'s processes an earlier run left, and the state file's record when its process
        still runs (None else)."""
        found = set(await anyio.to_thread.run_sync(marked, w.name, w.spec.upstream))
        record = self.records.get(w.name)
        if (
            record is not None
            and w.pid is None
            and (
                record.upstream != w.spec.upstream
                or not await anyio.to_thread.run_sync(still_running, record)
            )
        ):
            log.info(
                "%s: pid %d of an earlier run is gone (or is another process now); its record "
                "is dropped",
                w.name,
                record.pid,
            )
            record = None
        elif record is not None and w.pid is not None:
            record = None  # this run's own process: not a leftover
        if record is not None:
            found.add(record.pid)
        return found, record

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
        found, record = await self._leftovers(w)
        trees = {p.pid for pid in found for p in await anyio.to_thread.run_sync(process_tree, pid)}
        if not set(owners) & (found | trees):
            who = await anyio.to_thread.run_sync(describe_pid, owners[0])
            return (
                f"port {w.port} is already taken by {who}, which gpubroker did not start; "
                f"refusing to start a second {w.name} (stop it with `gpubroker workers stop "
                f"--pid {owners[0]}` or point upstream elsewhere)"
            )
        return await self._settle(w, found, record, may_wait=False)

    async def _look(self, w: Worker, leader: int, record: WorkerRecord | None) -> Leftover:
        argv = await anyio.to_thread.run_sync(cmdline, leader)
        proc = await anyio.to_thread.run_sync(process, leader)
        env = await anyio.to_thread.run_sync(environ, proc) if proc else {}
        own = record is not None and record.pid == leader
        pin = env.get("CUDA_VISIBLE_DEVICES", record.gpu if own and record else None)
        same_argv = argv == w.argv or (own and record is not None and list(record.argv) == w.argv)
        started = await anyio.to_thread.run_sync(start_time, leader)
        listening = await port_open(w.host, w.port)
        if listening:
            owners = await anyio.to_thread.run_sync(listening_on, w.port)
            if owners is not None:
                tree = {p.pid for p in await anyio.to_thread.run_sync(process_tree, leader)}
                listening = bool(tree & set(owners))
        return Leftover(
            pid=leader,
            same_command=same_argv and pin == ",".join(w.gpu_ids),
            listening=listening,
            healthy=listening and await self._healthy(w),
            age=time.time() - (started if started is not None else 0.0),
            doomed=own and record is not None and record.tied,
        )

    async def _settle(
        self, w: Worker, found: set[int], record: WorkerRecord | None, *, may_wait: bool
    ) -> str | None:
        """Judge ``w``'s leftovers and act: "adopted", None (stopped, or waited for: the port
        is free), else why the port stays taken."""
        owners = await anyio.to_thread.run_sync(listening_on, w.port) or []
        leader = _leader(found, record.pid if record else None, owners)
        left = await self._look(w, leader, record)
        verdict, why = judge(left, w.spec.start_timeout, may_wait=may_wait)
        if verdict == "adopt":
            await self._take_over(w, leader, found)
            return "adopted"
        if verdict == "wait":
            self._await_leftover(w, leader, found, left.age)
            return None
        log.info("%s: stopping pid %d left by an earlier run (%s)", w.name, leader, why)
        w.log.add(f"[gpubroker] stopping pid {leader} left by an earlier run: {why}")
        for pid in sorted(found):
            await self._kill_leftover(w, pid)
        if await port_open(w.host, w.port):
            return f"port {w.port} is still taken after stopping the earlier run's {w.name}"
        return None

    async def _take_over(self, w: Worker, leader: int, found: set[int]) -> None:
        """Adopt ``leader`` as ``w``'s process (ready); stop the rest of ``found``."""
        started = await anyio.to_thread.run_sync(start_time, leader)
        w.proc, w.pid, w.adopted = None, leader, True
        w.started_at = started if started is not None else time.time()
        w.ready_at = time.time()
        w.state = WorkerState.READY
        w.want_running = True
        w.error = None
        self._remember(w)
        self._follow_log(w)
        log.info("%s: adopted pid %d from an earlier run", w.name, leader)
        self._emit(WorkerAdopted, w, pid=leader)
        assert self._tg is not None
        self._tg.start_soon(self._monitor_adopted, w, leader)
        tree = await anyio.to_thread.run_sync(process_tree, leader)
        for other in found - {p.pid for p in tree}:
            await self._kill_leftover(w, other)

    def _await_leftover(self, w: Worker, leader: int, found: set[int], age: float) -> None:
        """``w``'s leftover is still loading: ``starting`` (the scheduler counts it as maybe
        holding VRAM, a start waits for it) until it answers or its ``startTimeout`` ends."""
        w.state, w.pid, w.adopted, w.want_running = WorkerState.STARTING, leader, True, True
        w.started_at = time.time() - age
        self._remember(w)
        self._emit(WorkerStarting, w, pid=leader)
        log.info("%s: pid %d left by an earlier run is still starting; waiting", w.name, leader)
        assert self._tg is not None
        self._tg.start_soon(self._wait_leftover, w, leader, found, age)

    async def _wait_leftover(self, w: Worker, leader: int, found: set[int], age: float) -> None:
        async with w.lock:
            deadline = anyio.current_time() + max(0.0, w.spec.start_timeout - age)
            p = await anyio.to_thread.run_sync(process, leader)
            healthy = False
            with anyio.CancelScope(deadline=deadline) as scope:
                w.start_scope = scope
                while p is not None and await anyio.to_thread.run_sync(is_alive, p):
                    if await port_open(w.host, w.port) and await self._healthy(w):
                        healthy = True
                        break
                    await anyio.sleep(LEFTOVER_POLL)
            w.start_scope = None
            if w.pid != leader or not w.want_running:
                return  # a stop came: it stops the process
            if healthy:
                await self._take_over(w, leader, found)
                return
            why = "it ended" if not scope.cancel_called else "not ready after startTimeout"
            w.log.add(f"[gpubroker] stopping pid {leader} left by an earlier run: {why}")
            log.info("%s: stopping pid %d left by an earlier run (%s)", w.name, leader, why)
            for pid in sorted(found):
                await self._kill_leftover(w, pid)
            w.proc, w.pid, w.adopted, w.want_running = None, None, False, False
            w.state = WorkerState.STOPPED
            self._remember(w)

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
            w.back = anyio.Event()  # not serving from now: leases wait for the restart
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
