"""Managed workers: GPU services that gpubroker starts, pins, supervises and stops itself.

A backend with ``command:`` is a managed worker. Its ``upstream`` says where it listens, and
``{port}`` in the command is that URL's port; ``{gpu_uuid}`` is the GPU it is pinned to.

- **Who starts it**: :meth:`Supervisor.start` is called from one place outside this class, the
  broker's load effect (``strategy.start_before_load``), so the scheduler knows of every
  on-demand start; this class starts workers by itself only for ``autostart`` (:meth:`run`) and
  to restart after a crash (``_recover``).
- **Start**: the port must be free (a worker from a previous run found there is adopted or
  stopped; anything else there is refused: never a duplicate). The command is spawned in its own
  process group (its own session) with ``CUDA_VISIBLE_DEVICES`` set to its GPU (a UUID where
  telemetry or the config gives one), and ``healthPath`` is polled (a plain TCP connect when
  unset) until it answers below 500, within ``startTimeout``, with a progress event each second.
- **Stop**: SIGTERM to the group and every descendant, SIGKILL after ``stopTimeout``, wait until
  every process of the tree is gone, then confirm the port is closed and (with telemetry) that none
  of its PIDs still holds VRAM, all within one deadline (:func:`procs.stop_tree`; how an eviction
  fits it into ``unloadTimeout`` is told in ``plugins/strategies/process.py``). A stop runs in the
  supervisor's own task group and shielded, so it always completes, whoever asked for it and
  whatever their timeout.
- **Crash**: an exit nobody asked for is restarted per ``restart:`` (``on-failure``: a non-zero
  exit or a signal; ``always``; ``never``) after an exponential backoff; ``max_crashes`` exits
  within ``window`` seconds mark it ``failed``. An exit during an explicit start (the command
  itself is wrong) fails at once: retrying a typo helps nobody.
- **Logs**: stdout and stderr, line by line, into a ring buffer (``gpubroker workers logs``) and,
  with ``logFile:``, appended to a file. A worker's output and its command line may show its
  secrets: they are for admins only (the read model's ``workers_json(admin=True)``), never in
  an event.
- **Pinning**: the monitor's warnings (``alerts.py``) raise ``pinned-to-wrong-GPU`` when
  telemetry sees a worker's PIDs (handed over by :meth:`Supervisor.roots`) on another GPU.

Worker states, and the race each transition guards against (a per-worker lock serialises the
operations that move them; crash recovery takes the same lock)::

    stopped ──start──► starting ──health answers──► ready ──stop──► stopping ──► stopped
       ▲                 │  ▲                         │                             ▲
       │     exit/timeout│  └──backoff── crash ◄──────┘                             │
       │                 ▼                                                          │
       └──── start ─── failed ◄── crash loop / restart: never ─── stop ─────────────┘
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
import httpx

from gpubroker.config.model import BackendConfig, Config
from gpubroker.errors import WorkerError
from gpubroker.events import (
    EventBus,
    WireEvent,
    WorkerCrashed,
    WorkerExited,
    WorkerFailed,
    WorkerGone,
    WorkerProgress,
    WorkerReady,
    WorkerStarting,
    WorkerStopped,
    WorkerStopping,
)
from gpubroker.statefile import StateFile
from gpubroker.telemetry.base import TelemetrySnapshot
from gpubroker.workers.adopt import Leftovers, stop_stray
from gpubroker.workers.parts import LOG_LINES, Backoff
from gpubroker.workers.procs import (
    AFTER_GRACE,
    MARKER,
    MARKER_UPSTREAM,
    Child,
    DetachedChild,
    Telemetry,
    port_open,
    process_tree,
    stop_tree,
)
from gpubroker.workers.records import WorkerRecord, start_time
from gpubroker.workers.spawn import not_runnable, spawn
from gpubroker.workers.worker import Worker, WorkerState, upstream_address

# What other modules import from here (the verbs' callers and the server's wiring).
__all__ = ["LOG_LINES", "MARKER", "MARKER_UPSTREAM", "Supervisor", "WorkerError", "WorkerState"]

log = logging.getLogger("gpubroker.workers.supervisor")

T = TypeVar("T")

HEALTH_INTERVAL = 0.1
PROGRESS_INTERVAL = 1.0
OUTPUT_WAIT = 1.0  # after a stop, for the worker's last words to reach its log


class Supervisor(Leftovers):
    """Starts, watches and stops every managed worker of one broker.

    ``telemetry`` (optional) returns the latest shared telemetry snapshot (the monitor's; it
    never reads the GPUs itself): it turns GPU indexes into UUIDs for the pin, lets a stop
    confirm the VRAM was freed, and lets ``stop_pid`` recognise a GPU process.
    """

    def __init__(
        self,
        config: Config,
        *,
        bus: EventBus,
        telemetry: Telemetry | None = None,
        backoff: Backoff | None = None,
        state: StateFile | None = None,
    ) -> None:
        """``bus``: where worker events go (``/events``, and :class:`WorkerGone` for the
        broker, so the next request starts a worker that ended for good, not a dead port).
        ``state``: the state file, loaded; its ``workers`` section says what an earlier run
        left running (``records.py``) and is kept up to date here."""
        self.config = config
        self.bus = bus
        self.workers = {b.name: Worker(b) for b in config.backends if b.command is not None}
        self.telemetry = telemetry
        self.backoff = backoff or Backoff()
        self.state = state
        self._section = state.section("workers") if state is not None else None
        self.records: dict[str, WorkerRecord] = {}  # an earlier run's, then this run's
        self._me = (os.getpid(), start_time(os.getpid()))
        if self._section is not None:
            self.records = self._earlier_records(self._section.loaded)
            self._section.provide(self._records_json)
        path = state.path if state is not None else None
        self.log_dir = path.parent / "workers" if path is not None else None  # detached logs
        self._tg: anyio.abc.TaskGroup | None = None
        self._http: httpx.AsyncClient | None = None  # for health checks, made on first use

    @property
    def snapshot(self) -> TelemetrySnapshot | None:
        return self.telemetry() if self.telemetry is not None else None

    # --- lifecycle ------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Adopt or stop leftovers, start ``autostart`` workers, watch until cancelled; then stop
        every worker (shielded: none survives its broker). This is the only place that stops
        them all: whoever runs the supervisor need not."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if self.state is not None:
                    tg.start_soon(self.state.keep_saved)
                try:
                    await self._stop_unknown()
                    await self._reconcile()
                    for w in self.workers.values():
                        if w.spec.autostart and w.state is WorkerState.STOPPED:
                            # starting from now on: whoever asks (the broker's reconcile) sees it
                            w.state, w.want_running = WorkerState.STARTING, True
                            tg.start_soon(self._autostart, w)
                    task_status.started()
                    await anyio.sleep_forever()
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._shutdown()
        finally:
            self._tg = None

    async def _shutdown(self) -> None:
        """Stop every worker (all at once) but the detached, release the health client, and
        save which workers still run (the detached) for the next start."""
        async with anyio.create_task_group() as tg:
            for w in self.workers.values():
                if w.spec.detach and w.pid is not None:
                    log.info("%s: pid %d left running (detach: true)", w.name, w.pid)
                    continue
                tg.start_soon(self._stop_now, w)
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()
        if self.state is not None:
            await self.state.save()

    async def _autostart(self, w: Worker) -> None:
        try:
            await self.start(w.name)
        except WorkerError as exc:
            log.warning("%s: autostart failed: %s", w.name, exc)

    # --- public verbs -----------------------------------------------------------------------

    def worker(self, name: str) -> Worker:
        try:
            return self.workers[name]
        except KeyError:
            raise WorkerError(f"no managed worker named {name!r}") from None

    def manages(self, name: str) -> bool:
        """Whether ``name`` is a managed worker (its backend has ``command:``)."""
        return name in self.workers

    def resident(self, name: str) -> bool | None:
        """For the scheduler: True when ready, False when stopped or failed, None (may hold
        VRAM, cannot say) while starting or stopping."""
        w = self.worker(name)
        if w.state is WorkerState.READY:
            return True
        if w.state in (WorkerState.STOPPED, WorkerState.FAILED):
            return False
        return None

    def recovering(self, name: str) -> bool:
        """Whether ``name`` crashed and waits for its restart (backoff, then start): it is
        not serving, though the scheduler keeps its room (the supervisor brings it back)."""
        w = self.workers.get(name)
        return w is not None and w.recovering

    async def wait_recovered(self, name: str) -> bool:
        """Wait for the restart of a crashed ``name``: True when it is ready again, False when
        it was marked failed or stopped instead."""
        w = self.worker(name)
        if w.back is not None:
            await w.back.wait()
        return w.state is WorkerState.READY

    def roots(self) -> dict[str, list[int]]:
        """Each running worker's leader PID, for attributing GPU processes to backends."""
        return {w.name: [w.pid] for w in self.workers.values() if w.pid is not None}

    async def start(self, name: str) -> None:
        """Start ``name`` and wait until its health check passes (at once if it is ready)."""
        w = self.worker(name)
        await self._job(lambda: self._start(w))

    async def stop(
        self, name: str, *, grace: float | None = None, limit: float | None = None
    ) -> dict[str, Any]:
        """Stop ``name`` (TERM, KILL after ``grace``, reap, confirm); report what was done.

        ``grace`` defaults to its ``stopTimeout``; ``limit`` bounds the whole stop, lock wait
        included (default ``grace`` + ``AFTER_GRACE``): what could not be confirmed by then is
        reported as such (see :func:`procs.stop_tree`).
        """
        w = self.worker(name)
        return await self._job(lambda: self._stop(w, grace, limit))

    async def stop_pid(self, pid: int, *, grace: float = 10.0) -> dict[str, Any]:
        """Stop a stray process: a GPU process per telemetry, or a marked gpubroker worker.

        A PID belonging to a managed worker stops that worker the usual way.
        """
        name = await self.owner_of(pid)
        if name is not None:
            return {**(await self.stop(name)), "worker": name}
        return await self._job(lambda: stop_stray(pid, grace, telemetry=self.telemetry))

    async def owner_of(self, pid: int) -> str | None:
        """The managed worker whose process tree holds ``pid``, if any."""
        for w in self.workers.values():
            if w.pid is None:
                continue
            tree = await anyio.to_thread.run_sync(process_tree, w.pid)
            if pid == w.pid or pid in {p.pid for p in tree}:
                return w.name
        return None

    # --- jobs: run in our own task group, so a caller's timeout never cuts one short ----------

    async def _job(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self._tg is None:
            raise WorkerError("the supervisor is not running")
        done = anyio.Event()
        box: dict[str, Any] = {}

        async def job() -> None:
            try:
                box["value"] = await fn()
            except Exception as exc:
                box["error"] = exc
            finally:
                done.set()

        self._tg.start_soon(job)
        await done.wait()
        if "error" in box:
            raise box["error"]
        if "value" not in box:  # cancelled with the supervisor: it is shutting down
            raise WorkerError("the supervisor is shutting down")
        return box["value"]

    def _emit(self, event: type[WireEvent], w: Worker, **fields: Any) -> None:
        """An event for ``/events``, which anyone may read: never a log line nor a command."""
        self.bus.publish(event(backend=w.name, **fields))

    def _ended(self, w: Worker) -> None:
        """``w`` ended unasked and will not come back by itself: tell the broker."""
        if self._tg is not None:
            self.bus.publish(WorkerGone(backend=w.name))

    def _fail(self, w: Worker, error: str) -> None:
        w.state = WorkerState.FAILED
        w.error = error
        log.warning("%s: failed: %s", w.name, error)
        self._emit(WorkerFailed, w, error=error)

    # --- start ------------------------------------------------------------------------------

    async def _start(self, w: Worker) -> None:
        async with w.lock:
            if w.state is WorkerState.READY:
                return
            w.want_running = True
            w.crashes.clear()
            error = await self._launch(w)
            if error is None:
                return
            if not w.want_running:
                raise WorkerError(f"{w.name}: stopped while starting")
            self._fail(w, error)  # its log's tail goes to the status, not into the message:
            raise WorkerError(  # the message reaches proxy clients (502 load_failed)
                f"{w.name}: {error} (its log: gpubroker workers logs {w.name})"
            )

    def _command(self, w: Worker) -> tuple[list[str], dict[str, str]]:
        return w.command(self.snapshot)

    async def _launch(self, w: Worker) -> str | None:
        """Spawn and wait for health; None when ready, else why not (the process is gone)."""
        w.state = WorkerState.STARTING
        w.error = None
        argv, env = self._command(w)
        w.argv = argv
        claimed = await self._claim_port(w)
        if claimed == "adopted":
            return None
        if claimed is not None:
            return claimed
        if not w.want_running:
            return "stopped while starting"
        missing = not_runnable(argv[0], env, w.spec.cwd)
        if missing is not None:
            return missing
        path = self._log_path(w) if w.spec.detach else None
        if path is not None:
            w.log.add(f"[gpubroker] detached: its output goes to {path}")
        try:
            proc, w.tied = await spawn(w.spec, argv, env, path)
        except OSError as exc:
            return f"cannot run {argv[0]!r}: {exc.strerror or exc}"
        w.proc, w.pid, w.adopted = proc, proc.pid, False
        w.started_at, w.ready_at = time.time(), None
        w.created = await anyio.to_thread.run_sync(start_time, proc.pid)
        self._remember(w)
        w.log.add(f"[gpubroker] started pid {proc.pid}: {' '.join(argv)}")
        log.info(
            "%s: started pid %d (CUDA_VISIBLE_DEVICES=%s)",
            w.name,
            proc.pid,
            env["CUDA_VISIBLE_DEVICES"],
        )
        self._emit(WorkerStarting, w, pid=proc.pid)
        assert self._tg is not None
        if isinstance(proc, DetachedChild):
            w.output_done = None
            self._follow_log(w)
        else:
            assert isinstance(proc, anyio.abc.Process)
            w.output_done = anyio.Event()
            self._tg.start_soon(w.pump_log, proc, w.output_done)
        self._tg.start_soon(self._monitor, w, proc)
        error: str | None = "stopped while starting"
        with anyio.CancelScope() as scope:
            w.start_scope = scope
            error = await self._await_health(w, proc)
        w.start_scope = None
        if scope.cancel_called:
            return "stopped while starting"  # the stop that cancelled us ends the process
        if error is not None:
            with anyio.CancelScope(shield=True):
                await self._terminate(w, grace=min(w.spec.stop_timeout, 2.0), quiet=True)
            w.state = WorkerState.STARTING  # the caller decides: failed, or another try
            return error
        w.state = WorkerState.READY
        w.ready_at = time.time()
        took = w.ready_at - (w.started_at or w.ready_at)
        log.info("%s: ready after %.0f ms", w.name, round(took * 1000, 1))
        self._emit(WorkerReady, w, pid=w.pid, took=took)
        return None

    async def _await_health(self, w: Worker, proc: Child) -> str | None:
        started = time.monotonic()
        deadline = started + w.spec.start_timeout
        last_progress = started
        while True:
            if proc.returncode is not None:
                return f"exited with code {proc.returncode} before it was ready"
            if await self._healthy(w):
                if proc.returncode is None:
                    return None
                continue
            now = time.monotonic()
            if now >= deadline:
                return f"not ready after startTimeout {w.spec.start_timeout:g}s"
            if now - last_progress >= PROGRESS_INTERVAL:
                last_progress = now
                self._emit(WorkerProgress, w, waited=now - started)
            await anyio.sleep(HEALTH_INTERVAL)

    async def _healthy(self, w: Worker) -> bool:
        if not w.spec.health_path:
            return await port_open(w.host, w.port)
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=2.0, trust_env=False)
        try:
            response = await self._http.get(w.spec.upstream + w.spec.health_path)
        except httpx.HTTPError:
            return False
        return response.status_code < 500

    # --- watching ---------------------------------------------------------------------------

    async def _monitor(self, w: Worker, proc: Child) -> None:
        """Notice the exit of a spawned worker; an exit while ``ready`` is a crash."""
        code = await proc.wait()
        if w.proc is proc and w.state is WorkerState.READY:
            assert self._tg is not None
            w.back = anyio.Event()  # not serving from now: leases wait for the restart
            self._tg.start_soon(self._recover, w, proc, code)

    async def _recover(self, w: Worker, proc: Child | None, code: int | None) -> None:
        """A worker exited unasked: clean up what is left, then restart with backoff or fail.

        From the moment the exit is seen until the restart ends, ``w.recovering`` holds: the
        broker's leases wait for it (or are refused once it fails) rather than meeting a dead
        port."""
        if not w.recovering:
            w.back = anyio.Event()
        back = w.back
        try:
            await self._recover_locked(w, proc, code)
        finally:
            if back is not None:
                back.set()

    async def _recover_locked(self, w: Worker, proc: Child | None, code: int | None) -> None:
        async with w.lock:
            if w.proc is not proc or not w.want_running or w.state is not WorkerState.READY:
                return
            while True:
                pid = w.pid
                if pid is not None:  # whatever the dead leader left behind may hold VRAM
                    with anyio.CancelScope(shield=True):
                        await self._terminate(w, grace=1.0, quiet=True)
                now = time.monotonic()
                w.crashes.append(now)
                while w.crashes and now - w.crashes[0] > self.backoff.window:
                    w.crashes.popleft()
                if code is not None:
                    w.last_exit = {"code": code, "at": time.time()}
                log.warning("%s: pid %s exited unasked (code %s)", w.name, pid, code)
                policy = w.spec.restart
                clean = code == 0
                if policy == "never" or (policy == "on-failure" and clean):
                    if clean:
                        w.state = WorkerState.STOPPED
                        self._emit(WorkerExited, w, code=code)
                    else:
                        self._fail(w, f"exited with code {code} (restart: never)")
                    self._ended(w)
                    return
                if len(w.crashes) >= self.backoff.max_crashes:
                    self._fail(
                        w,
                        f"crash loop: exited {len(w.crashes)} times within "
                        f"{self.backoff.window:g}s (last code {code})",
                    )
                    self._ended(w)
                    return
                delay = self.backoff.delay(len(w.crashes))
                w.state = WorkerState.STARTING
                self._emit(WorkerCrashed, w, code=code, restart_in=delay)
                with anyio.CancelScope() as scope:
                    w.backoff_scope = scope
                    await anyio.sleep(delay)
                w.backoff_scope = None
                if scope.cancel_called or not w.want_running:
                    return
                w.restarts += 1
                error = await self._launch(w)
                if error is None or not w.want_running:
                    return
                code = (w.last_exit or {}).get("code")  # and go round: another crash

    # --- stop -------------------------------------------------------------------------------

    async def _stop(self, w: Worker, grace: float | None, limit: float | None) -> dict[str, Any]:
        grace = w.spec.stop_timeout if grace is None else grace
        limit = grace + AFTER_GRACE if limit is None else limit
        deadline = anyio.current_time() + limit
        w.want_running = False
        if w.start_scope is not None:
            w.start_scope.cancel()
        if w.backoff_scope is not None:
            w.backoff_scope.cancel()
        async with w.lock:
            w.want_running = False
            if w.pid is None:  # a failed worker stays failed (with its log) until started
                if w.state is not WorkerState.FAILED:
                    w.state = WorkerState.STOPPED
                return {"stopped": False, "message": f"{w.name} was not running"}
            grace = max(0.0, min(grace, deadline - anyio.current_time()))
            with anyio.CancelScope(shield=True):
                report = await self._terminate(w, grace=grace, deadline=deadline)
            w.state = WorkerState.STOPPED
            w.error = None
            w.last_stop = {"stopped": True, **report}
            self._emit(WorkerStopped, w, report=report)
            return w.last_stop

    async def _stop_now(self, w: Worker) -> None:
        """Shutdown: cancel what is pending and stop, never raising."""
        try:
            with anyio.CancelScope(shield=True):
                await self._stop(w, None, None)
        except Exception as exc:  # pragma: no cover - a stop must not stop the others
            log.error("%s: stop at shutdown failed: %s", w.name, exc)

    async def _terminate(
        self, w: Worker, *, grace: float, deadline: float | None = None, quiet: bool = False
    ) -> dict[str, Any]:
        """Stop the worker's tree (see :func:`procs.stop_tree`) within ``deadline``, then let its
        last output reach the log, in what is left of that time."""
        pid = w.pid
        assert pid is not None
        if deadline is None:
            deadline = anyio.current_time() + grace + AFTER_GRACE
        if not quiet:
            w.state = WorkerState.STOPPING
            self._emit(WorkerStopping, w, pid=pid)
        report = await stop_tree(
            pid,
            grace,
            deadline=deadline,
            child=w.proc,
            address=(w.host, w.port),
            telemetry=self.telemetry,
        )
        if w.output_done is not None:  # its last words go in the log before ours
            with anyio.CancelScope(deadline=min(deadline, anyio.current_time() + OUTPUT_WAIT)):
                await w.output_done.wait()
        w.log.add(f"[gpubroker] pid {pid} stopped ({report['signal']}, {report['ms']:.0f} ms)")
        if w.proc is not None and w.proc.returncode is not None:
            w.last_exit = {"code": w.proc.returncode, "at": time.time()}
        w.proc, w.pid, w.adopted = None, None, False
        w.created, w.tied = None, False
        self._remember(w)
        return report

    # --- reload (``gpubroker reload``): workers added, removed, respecified ------------------

    def add(self, spec: BackendConfig) -> None:
        """A backend with ``command:`` the config gained: managed from now on (started on
        demand, or now with ``autostart``)."""
        if spec.name in self.workers:
            raise WorkerError(f"{spec.name} is already a managed worker")
        w = self.workers[spec.name] = Worker(spec)
        if spec.autostart and self._tg is not None:
            w.state, w.want_running = WorkerState.STARTING, True
            self._tg.start_soon(self._autostart, w)

    async def retire(self, name: str) -> None:
        """Stop ``name`` (if it runs) and forget it: its backend left the config, or lost its
        ``command:``."""
        if name not in self.workers:
            return
        if self._tg is not None:
            await self.stop(name)
        self.workers.pop(name, None)

    def respec(self, name: str, spec: BackendConfig) -> bool:
        """``name``'s new config, used from its next start on. True when what its process runs
        with changed (command, env, cwd, upstream, pin, log file) while a process runs: the
        caller restarts it once its backend is idle. Where it listens changes only while no
        process runs (a stop confirms the old port closed)."""
        w = self.worker(name)
        before = w.spec
        w.spec = spec
        if w.pid is None:
            w.host, w.port = upstream_address(spec.upstream)
        runs = ("command", "env", "cwd", "upstream", "gpu", "log_file", "detach")
        changed = any(getattr(before, a) != getattr(spec, a) for a in runs)
        return changed and w.pid is not None
