"""The broker: carries out the scheduler's effects and hands out leases to the proxy.

The scheduler decides synchronously; this module does the I/O it asks for (idle checks, unloads,
loads), each in its own task and each bounded in time, and feeds the outcomes back. Everything
runs on one event loop and every scheduler call is synchronous, so the scheduler's state has one
writer at a time without a lock.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from anyio.abc import TaskGroup

from gpubroker import events as ev
from gpubroker.config.model import Config
from gpubroker.errors import Refused, SwapInProgress
from gpubroker.logs import request_id
from gpubroker.plugins.strategies.base import FIRST_POLL, Job, Strategy
from gpubroker.scheduling import memory
from gpubroker.scheduling.effects import (
    Admit,
    CancelSwap,
    Effect,
    Load,
    Note,
    Refuse,
    SwapDone,
    SwapInfo,
    SwapRecord,
    Unload,
    WaitIdle,
)
from gpubroker.scheduling.jobs import JobFollower
from gpubroker.scheduling.notes import note_event
from gpubroker.scheduling.preload import PreloadStep, preload_all
from gpubroker.scheduling.scheduler import Scheduler, State
from gpubroker.scheduling.swaplog import SwapLog
from gpubroker.scheduling.units import Footprints, Placed, Units, model_spec
from gpubroker.scheduling.waiting import wait_note
from gpubroker.statefile import StateFile
from gpubroker.workers.start import start_before_load

if TYPE_CHECKING:
    from gpubroker.workers.supervisor import Supervisor

log = logging.getLogger("gpubroker.scheduling.broker")

IDLE_POLL = 0.05  # seconds between busy() polls at most while a victim drains (from 5 ms up)
HISTORY = 50  # swaps kept for the status page
SHUTTING_DOWN = "gpubroker is shutting down; try again once it is back"
CONFIRM_AFTER_FAILURE = 0.5  # seconds telemetry gets to show a failed unload freed memory anyway
FORGET_TRIES = 100  # a worker gone for good: evict it, retrying past a swap in progress…
FORGET_RETRY = 0.1  # …this often (a plan on the same GPU ends within its own timeouts)
SAVE_GRACE = 2.0  # seconds the last write of learned footprints may take as the broker stops
RETRY_FAILED = 5.0  # Retry-After for a worker that failed while its request waited: the next
# request starts it afresh
REMOVED = "{} was removed from the config (gpubroker reload); try again later"


class FreedConfirmer(Protocol):
    """Telemetry's word on an unload (the monitor's): waits up to ``limit`` s for
    ``backend``'s memory to come back; None when it did (or cannot be seen), else why not."""

    async def wait_freed(self, backend: str, limit: float) -> str | None: ...


@dataclass(slots=True)
class Grant:
    """An admitted lease, as the proxy sees it."""

    lease: int
    backend: str
    queued_s: float
    swap: SwapInfo | None


@dataclass(slots=True)
class _Pending:
    """A lease waiting for the scheduler's answer. ``event`` is made only for a lease that
    has to wait: most are answered within ``Scheduler.request`` itself."""

    admit: Admit | None = None
    refuse: Refuse | None = None
    event: anyio.Event | None = None

    @property
    def answered(self) -> bool:
        return self.admit is not None or self.refuse is not None

    def answer(self, effect: Admit | Refuse) -> None:
        if isinstance(effect, Admit):
            self.admit = effect
        else:
            self.refuse = effect
        if self.event is not None:
            self.event.set()


@dataclass(slots=True)
class LiveRequest:
    lease: int
    backend: str
    path: str
    since: float
    admitted_at: float | None = None
    method: str = "POST"
    caller: str | None = None  # who asked: a key's name, the client's own name, its address
    model: str | None = None  # the model asked for, where the api port or its body tells
    unit: str | None = None  # what it holds in the scheduler: the backend, or one of its models


@dataclass(slots=True)
class EvictJob:
    done: anyio.Event = field(default_factory=anyio.Event)
    info: SwapInfo | None = None


class Broker:
    """Owns the scheduler and the strategies; one per ``gpubroker serve``."""

    def __init__(
        self,
        config: Config,
        strategies: Mapping[str, Strategy],
        sched: Scheduler,
        bus: ev.EventBus,
        *,
        supervisor: Supervisor | None = None,
        confirm_freed: FreedConfirmer | None = None,
        footprints: Footprints | None = None,
        state: StateFile | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``supervisor``: managed workers (``command:``), started before their load.
        ``confirm_freed``: given when telemetry runs, to check what an unload freed.
        ``footprints``: learned footprints, kept across restarts. ``state``: the state file,
        loaded: the swap history and counters an earlier run left continue here
        (``scheduling/memory.py``)."""
        self.config = config
        self.strategies = dict(strategies)
        self.clock = clock
        self.sched = sched
        self.bus = bus
        self.supervisor = supervisor
        self.confirm_freed = confirm_freed
        self.started_at = time.time()
        self.history: deque[SwapRecord] = deque(maxlen=HISTORY)
        self.live: dict[int, LiveRequest] = {}
        self.counters: dict[str, dict[str, int]] = {
            b.name: {"gpu": 0, "passthrough": 0, "refused": 0, "upstream_errors": 0}
            for b in config.backends
        }
        self._follower = JobFollower(
            self.strategies, timeout=config.unload_timeout, clock=clock, on_read=self._jobs_read
        )
        self.measured: dict[str, dict[str, int | None]] = {}  # backend -> GPU -> bytes seen held
        self._held_before: dict[str, int | None] = {}  # measured as an unload began
        self._pending: dict[int, _Pending] = {}
        self._evictions: dict[int, EvictJob] = {}
        self._idle_scopes: dict[int, list[anyio.CancelScope]] = {}
        self._ids = itertools.count(1)
        self._tg: TaskGroup | None = None
        self._wake = anyio.Event()
        self._armed: float | None = None  # the deadline the clock loop sleeps until
        self.closing = False
        self._swaplog = SwapLog(sched, clock)  # the swap phases at info, with their timings
        self.units = Units(
            config,
            self.strategies,
            sched,
            self._apply,
            book=footprints,
            clock=clock,
            measured_total=self.measured_total,
        )
        bus.subscribe(self._on_event, (ev.Measured, ev.Unmanaged, ev.WorkerGone))
        self._draining: set[str] = set()  # backends a reload removes: refused, then forgotten
        self._models_followed = bool(self.units.per_model)  # run() follows them from the start
        self.preloads: list[PreloadStep] = []  # the start-up preload's progress
        self.state = state
        self._memory = (
            None
            if state is None
            else memory.Memory(
                state.section("broker"), self.history, self.counters, lambda: self.sched.swap_count
            )
        )

    # --- lifecycle ------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Reconcile with the services, then drive timeouts until cancelled."""
        try:
            await self._run(task_status)
        finally:
            self._tg = None  # leases that end from now on are released at once
            with anyio.CancelScope(shield=True), anyio.move_on_after(SAVE_GRACE):
                await self.units.save()  # what this run learned, for the next
                if self.state is not None:
                    await self.state.save()

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await self.reconcile()
            self._follower.follow_all(tg)  # work queued before we started is in flight too
            if self.units.per_model:
                tg.start_soon(self.units.follow_all)
            tg.start_soon(self.units.keep_saved)
            if self._memory is not None:
                tg.start_soon(self._memory.keep)
            task_status.started()
            await self._clock_loop()

    async def reconcile(self) -> None:
        """Ask every strategy what it holds, all at once, each bounded by ``unloadTimeout``."""
        results: dict[str, bool | None] = {}

        async def ask(name: str, strategy: Strategy) -> None:
            results[name] = None
            with anyio.move_on_after(self.config.unload_timeout):
                try:
                    results[name] = await strategy.resident()
                except Exception as exc:  # a service that is down is simply unknown
                    log.info("%s: cannot tell what it holds (%s)", name, exc)

        async with anyio.create_task_group() as tg:
            for name, strategy in self.strategies.items():
                tg.start_soon(ask, name, strategy)
        for name in self.strategies:
            self._apply(self.sched.reconciled(name, results[name], self.clock()))
        for name in sorted(self.units.per_model):  # and what they hold, model by model
            await self.units.follow(name)

    async def _clock_loop(self) -> None:
        """Tick at the scheduler's next deadline; ``_apply`` wakes us when one comes sooner."""
        while True:
            deadline = self._armed = self.sched.next_deadline()
            wait = None if deadline is None else max(0.0, deadline - self.clock())
            with anyio.move_on_after(wait if wait is not None else float("inf")):
                await self._wake.wait()
            self._wake = anyio.Event()
            self._apply(self.sched.tick(self.clock()))

    # --- leases ---------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(
        self,
        backend: str,
        path: str = "",
        *,
        count: bool = True,
        method: str = "POST",
        caller: str | None = None,
        model: str | None = None,
        body: bytes | None = None,
        on_queued: Callable[[int], None] | None = None,
    ) -> AsyncIterator[Grant]:
        """Hold the GPU for ``backend`` (or one unit of it, by name) for the body of the
        ``async with``.

        Waits in the queue as long as the scheduler says; raises :class:`Refused` when refused.
        Cancelling the waiting task (the client went away) leaves the queue cleanly.
        ``caller`` and ``model`` are shown with the lease (status, its events). ``body``: the
        request's body where :meth:`wants_body` asked for it, read for the model and memory
        it asks for. ``on_queued`` is called with the lease's id when it is not admitted at
        once (it queues, a swap runs for it, or its crashed worker's restart is awaited), and
        only then, once: ``progress(id)`` says what it waits for.
        """
        spec = self.sched.slots[backend].spec
        backend = spec.backend
        if spec.group:  # a unit named outright (an admin swap to one model)
            placed = Placed(spec.name, model=spec.model)
        elif not self.closing:
            placed = await self.units.place(backend, method, path, body)
        if self.closing:  # stopping, or it stopped while the strategy read the body
            raise Refused.of(
                Refuse(0, backend, 503, "shutting_down", SHUTTING_DOWN, retry_after=5.0)
            )
        if self._draining and backend in self._draining:
            raise Refused.of(self._removed(0, backend))
        if placed.need == 0:  # it asks for no memory (an unload request): nothing to place
            self.record_passthrough(backend)
            yield Grant(0, backend, 0.0, None)
            return
        lease = next(self._ids)
        request_id.set(lease)  # this request's task logs under its lease id (gpubroker.logs)
        now = self.clock()
        pending = _Pending()
        self._pending[lease] = pending
        self.live[lease] = LiveRequest(
            lease,
            backend,
            path,
            time.time(),
            method=method,
            caller=caller,
            model=model or placed.model,
            unit=placed.unit,
        )
        deferred = False  # the release (and the live entry) passed on to _settle
        try:
            self._apply(self.sched.request(lease, placed.unit, now, placed.need, placed.fresh))
            waits = not pending.answered  # (answered: admitted at once, no loop round trip)
            if on_queued is not None and waits:
                on_queued(lease)
            try:
                if not pending.answered:
                    pending.event = anyio.Event()
                    await pending.event.wait()
            except BaseException:
                self._apply(self.sched.cancel(lease, self.clock()))
                raise
            if pending.refuse is not None:
                self.counters[backend]["refused"] += 1
                raise Refused.of(pending.refuse)
            assert pending.admit is not None
            self.live[lease].admitted_at = time.time()
            self.units.admitted(placed)
            if count:
                self.counters[backend]["gpu"] += 1
            queued = self.clock() - now
            self._publish(ev.Admitted, backend=backend, lease=lease, queued=queued)
            try:
                if self.supervisor is not None and self.supervisor.recovering(backend):
                    if on_queued is not None and not waits:  # it waits after all: watched too
                        on_queued(lease)
                    await self._worker_back(backend, lease, now)  # a crashed worker's restart
                yield Grant(lease, backend, self.clock() - now, pending.admit.swap)
            finally:
                if backend in self.jobs and self._tg is not None:
                    # The request may have queued a job that runs after its HTTP call ended:
                    # the lease ends only once the service's queue has been read.
                    release = functools.partial(self._release, lease)
                    settle = self._follower.settle
                    self._tg.start_soon(settle, backend, self.clock(), release, self._tg)
                    deferred = True
                else:
                    self._apply(self.sched.released(lease, self.clock()))
                    self.units.touched(placed.unit)
        finally:
            self._pending.pop(lease, None)
            if not deferred:
                self.live.pop(lease, None)

    def wants_body(self, backend: str) -> bool:
        """Whether a GPU request for ``backend`` should bring its body to :meth:`lease`: its
        strategy reads what the request asks of memory (the model, its context, its files)."""
        return self.units.reads_body(backend)

    def progress(self, lease: int) -> str | None:
        """What the queued ``lease`` waits for, in a few words; None once it waits no more."""
        return wait_note(self.sched, lease, self.clock())

    def _release(self, lease: int) -> None:
        """End a lease whose release waited for its service's queue to be read (its live entry
        goes after its ``released``, which is told, as elsewhere, whose it was and how long)."""
        try:
            self._apply(self.sched.released(lease, self.clock()))
        finally:
            self.live.pop(lease, None)

    @property
    def jobs(self) -> dict[str, list[Job]]:
        """The services' own queues (ComfyUI's), as last read; only backends that report one."""
        return self._follower.jobs

    def _jobs_read(self, backend: str, jobs: list[Job], before: int) -> None:
        """A reading of ``backend``'s queue: count it into the scheduler; publish a change."""
        self._apply(self.sched.jobs(backend, len(jobs), self.clock()))
        if len(jobs) != before:
            running = sum(1 for j in jobs if j.state == "running")
            pending = len(jobs) - running
            self._publish(
                ev.Jobs, backend=backend, count=len(jobs), running=running, pending=pending
            )

    def first_byte(self, lease: int) -> None:
        """The proxy sent the first body byte of ``lease``'s response."""
        live = self.live.get(lease)
        if live is not None:
            self._publish(ev.FirstByte, backend=live.backend, lease=lease)

    def measure(self, backend: str, per_gpu: Mapping[str, int | None]) -> None:
        """Telemetry's bytes held by ``backend`` per GPU; the scheduler sizes by the larger."""
        if per_gpu:
            self.measured[backend] = dict(per_gpu)
        else:  # no GPU readings at all: nothing measured
            self.measured.pop(backend, None)
        for gpu, nbytes in per_gpu.items():
            self._apply(self.sched.measured(backend, gpu, nbytes, self.clock()))
        idle = not self.sched.in_flight(backend)
        self.units.measured(backend, self.measured_total(backend), idle)

    def measured_total(self, backend: str) -> int | None:
        return ev.total_held(self.measured.get(backend))

    def close(self) -> None:
        """The broker is stopping: refuse what waits and what comes; in-flight work finishes."""
        self.closing = True
        self._apply(self.sched.refuse_all(503, "shutting_down", SHUTTING_DOWN, self.clock()))
        self._publish(ev.BrokerShuttingDown)

    async def evict(self, backend: str | None, *, force: bool = False) -> SwapInfo | None:
        """Admin unload: free ``backend`` (all when None) and wait until it is done."""
        swap_id, effects = self.sched.evict(backend, force, self.clock())
        if swap_id is None:
            return None
        job = self._evictions[swap_id] = EvictJob()
        self._apply(effects)
        await job.done.wait()
        return job.info

    async def preload(self, backend: str) -> Grant:
        """Admin swap: take and at once release a lease, so ``backend`` becomes the owner."""
        async with self.lease(backend, "(swap)", count=False) as grant:
            return grant

    async def preload_all(self, targets: tuple[str, ...] | list[str]) -> None:
        """Start-up ``preload:``: make ``targets`` resident in order, within the budget, never
        evicting (``scheduling/preload.py``); progress in :attr:`preloads` and on the bus."""
        await preload_all(self, targets)

    async def _worker_back(self, backend: str, lease: int, since: float) -> None:
        """``backend``'s managed worker crashed and waits for its restart: wait for it (within
        what is left of ``queueTimeout``), or refuse with 503 once it is marked failed."""
        assert self.supervisor is not None
        left = max(0.0, self.config.queue_timeout - (self.clock() - since))
        code = "queue_timeout"
        message = f"{backend} crashed and is still restarting after queueTimeout"
        with anyio.move_on_after(left):
            if await self.supervisor.wait_recovered(backend):
                return
            w = self.supervisor.worker(backend)
            code = "worker_failed"
            message = f"{backend} crashed and did not come back: {w.error or w.state.value}"
        self.counters[backend]["refused"] += 1
        refusal = Refuse(lease, backend, 503, code, message, RETRY_FAILED)
        self._publish(ev.LeaseRefused, backend=backend, lease=lease, status=503, reason=code)
        raise Refused.of(refusal)

    @property
    def swaps_before(self) -> int:
        """Swaps of earlier runs (the state file): ``swapCount`` continues from them."""
        return self._memory.before if self._memory is not None else 0

    # --- effects --------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        self._carry_out(effects)
        # Any event may set a sooner deadline (a hold, a minimum residency, an idle timeout):
        # wake the clock loop so it re-arms, without waking it for deadlines it already has.
        deadline = self.sched.next_deadline()
        if deadline is not None and (self._armed is None or deadline < self._armed):
            self._wake.set()

    def _carry_out(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Admit | Refuse):
                pending = self._pending.get(effect.lease)
                if pending is None:
                    continue
                if isinstance(effect, Refuse):
                    self._publish(
                        ev.LeaseRefused,
                        backend=effect.backend,
                        lease=effect.lease,
                        status=effect.status,
                        reason=effect.code,
                    )
                pending.answer(effect)
            elif isinstance(effect, WaitIdle):
                self._spawn(self._wait_idle, effect)
            elif isinstance(effect, Unload):
                self._spawn(self._unload, effect)
            elif isinstance(effect, Load):
                self._spawn(self._load, effect)
            elif isinstance(effect, CancelSwap):
                for scope in self._idle_scopes.pop(effect.swap, []):
                    scope.cancel()
            elif isinstance(effect, SwapDone):
                self._swap_done(effect)
            elif isinstance(effect, Note):
                self._note(effect)

    def _spawn(self, fn: Callable[[Any], Any], effect: Effect) -> None:
        if self._tg is None:
            raise RuntimeError("the broker is not running")
        self._tg.start_soon(fn, effect)

    def _strategy(self, unit: str) -> Strategy:
        return self.strategies[self.sched.slots[unit].spec.backend]

    async def _wait_idle(self, effect: WaitIdle) -> None:
        strategy = self._strategy(effect.backend)
        with anyio.CancelScope() as scope:
            self._idle_scopes.setdefault(effect.swap, []).append(scope)
            delay = FIRST_POLL
            while True:
                try:
                    with anyio.fail_after(self.config.unload_timeout):
                        busy = await strategy.busy()
                except Exception as exc:  # cannot ask: do not hold the GPU forever on it
                    log.warning("%s: busy() failed (%s); treating it as idle", effect.backend, exc)
                    busy = False
                if not busy:
                    break
                await anyio.sleep(delay)
                delay = min(delay * 2, IDLE_POLL)
        if scope.cancel_called:
            return
        self._apply(self.sched.idle(effect.swap, effect.backend, self.clock()))

    async def _unload(self, effect: Unload) -> None:
        model = self.sched.slots[effect.backend].spec.model
        if model is not None:  # one model: the service's own list confirms it went
            strategy = self._strategy(effect.backend)
            unload = functools.partial(strategy.unload_model, model)
            error = await self._bounded(unload, self.config.unload_timeout)
            holding = False
            if error:
                log.warning("%s: unload failed: %s", effect.backend, error)
                holding = await self.units.still_loaded(effect.backend)
            self.units.unloaded(effect.backend)
            effects = self.sched.unloaded(
                effect.swap, effect.backend, error, self.clock(), holding=holding
            )
            self._apply(effects)
            return
        started = self.clock()
        error = await self._bounded(
            self.strategies[effect.backend].unload, self.config.unload_timeout
        )
        self.units.unloaded(effect.backend)
        holding = False
        if error:
            log.warning("%s: unload failed: %s", effect.backend, error)
            if self.confirm_freed is not None:  # did it free its memory all the same?
                confirm = self.confirm_freed.wait_freed
                holding = await confirm(effect.backend, CONFIRM_AFTER_FAILURE) is not None
        elif self.confirm_freed is not None:
            # The service said done; where telemetry can see its memory, believe that instead.
            left = max(0.0, self.config.unload_timeout - (self.clock() - started))
            error = await self.confirm_freed.wait_freed(effect.backend, left)
            holding = error is not None
            if holding:
                log.warning("%s: %s; it still counts as resident", effect.backend, error)
        effects = self.sched.unloaded(
            effect.swap, effect.backend, error, self.clock(), holding=holding
        )
        self._apply(effects)

    async def _load(self, effect: Load) -> None:
        spec = self.sched.slots[effect.backend].spec
        backend = self.config.backend(spec.backend)
        strategy = self.strategies[backend.name]

        async def load() -> None:
            await start_before_load(self.supervisor, backend.name)  # a managed worker's process
            if spec.model is not None:
                await strategy.load_model(spec.model)
            else:
                await strategy.load()

        error = await self._bounded(load, backend.start_timeout)
        self.units.touched(effect.backend)
        self._apply(self.sched.loaded(effect.swap, effect.backend, error, self.clock()))

    @staticmethod
    async def _bounded(fn: Callable[[], Any], limit: float) -> str | None:
        try:
            with anyio.fail_after(limit):
                await fn()
        except TimeoutError:
            return f"timed out after {limit:g}s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _swap_done(self, effect: SwapDone) -> None:
        info = effect.info
        self._idle_scopes.pop(effect.swap, None)
        self._swaplog.done(effect)
        if info.evicted:
            self.history.appendleft(SwapRecord(time.time(), info))
            if self._memory is not None:
                self._memory.swapped()
            target = self.sched.slots[info.target].spec if info.target is not None else None
            self._publish(
                ev.Swapped,
                backend=target.backend if target is not None else None,
                model=target.model if target is not None else None,
                swap=effect.swap,
                evicted=tuple(info.evicted),
                drain=info.drain_s,
                unload=info.unload_s,
                load=info.load_s,
                total=info.total_s,
            )
        job = self._evictions.pop(effect.swap, None)
        if job is not None:
            job.info = info
            job.done.set()

    def _note(self, note: Note) -> None:
        """A scheduler note as a typed event (:func:`~gpubroker.scheduling.notes.note_event`).

        What a backend held as its unload began (measured, else None) is kept for its ``freed``.
        """
        self._swaplog.note(note)
        held = None
        if note.backend is not None and note.kind == "unloading":
            self._held_before[note.backend] = self._held(note.backend)
        elif note.backend is not None and note.kind == "unloaded":
            held = self._held_before.pop(note.backend, None)
        event, fields = note_event(note, self.sched, held)
        backend, model = note.backend, None
        if backend is not None:  # a unit's news is its backend's, naming the model
            spec = self.sched.slots[backend].spec
            backend, model = spec.backend, spec.model
        if model is not None:
            fields["model"] = model
        self._publish(event, backend=backend, lease=note.lease, **fields)

    def _held(self, unit: str) -> int | None:
        """What ``unit`` holds as measured: a model's own reading, else its backend's."""
        slot = self.sched.slots[unit]
        if slot.spec.group:
            return ev.total_held(dict(slot.measured)) if slot.measured else None
        return self.measured_total(unit)

    def _publish(self, event: type[ev.WireEvent], **fields: Any) -> None:
        """Publish ``event``, stamped with the time and, where known, how long its lease (or
        else its swap) has been going; a lease's steps also say whose it is. An event nobody
        reads (a lease's ``released`` with no ``/events`` reader) is not built."""
        if not self.bus.wants(event):
            return
        at = time.time()
        lease, swap = fields.get("lease"), fields.get("swap")
        elapsed = None
        if lease is not None:
            live = self.live.get(lease)
            if live is not None:
                elapsed = at - live.since
                if issubclass(event, ev.LeaseStep):
                    fields.update(caller=live.caller, model=live.model)
        elif isinstance(swap, int) and (plan := self.sched.plans.get(swap)) is not None:
            elapsed = self.clock() - plan.started
        self.bus.publish(event(at=at, elapsed=elapsed, **fields))

    def _on_event(self, event: ev.Event) -> None:
        """News for the broker: telemetry's measurements (what each backend holds, and what
        nobody owns), managed workers gone for good."""
        if isinstance(event, ev.Measured):
            self.measure(event.backend, event.per_gpu)
        elif isinstance(event, ev.Unmanaged):
            for gpu, nbytes in event.per_gpu.items():
                self._apply(self.sched.unmanaged(gpu, nbytes, self.clock()))
        elif isinstance(event, ev.WorkerGone) and self._tg is not None:
            self._tg.start_soon(self.forget, event.backend)

    async def forget(self, name: str) -> None:
        """Free ``name`` in the scheduler, forced: a managed worker ended unasked and will not
        come back by itself (its requests are gone with it), so the next request starts it again
        rather than meeting a dead port; or ``workers start`` found it counted resident while
        its process is not ready."""
        for _ in range(FORGET_TRIES):  # bounded: a plan on the same GPU ends in its timeouts
            try:
                await self.evict(name, force=True)
                return
            except SwapInProgress:
                await anyio.sleep(FORGET_RETRY)

    # --- status ---------------------------------------------------------------------------

    def record_passthrough(self, backend: str) -> None:
        self.counters[backend]["passthrough"] += 1

    def record_upstream_error(self, backend: str) -> None:
        self.counters[backend]["upstream_errors"] += 1

    # --- reload (``gpubroker reload``): the config changed under a running broker ----------

    def reconfigure(
        self, config: Config, strategies: Mapping[str, Strategy], plan: Scheduler | None = None
    ) -> None:
        """``config`` is what runs from now on (with any backend still draining in it) and
        ``strategies`` every backend's strategy, new or replaced ones included. ``plan``: a
        scheduler built from the new config, never run: its units are added (absent until
        :meth:`welcome`) or respecified here, and its timings taken, for the next decisions."""
        self.config = config
        for name in [n for n in self.strategies if n not in strategies]:
            del self.strategies[name]
        self.strategies.update(strategies)  # the one dict Units reads too
        for b in config.backends:
            self.counters.setdefault(
                b.name, {"gpu": 0, "passthrough": 0, "refused": 0, "upstream_errors": 0}
            )
        self._follower.track(self.strategies)
        if plan is not None:
            self.sched.retune(
                queue_timeout=plan.queue_timeout,
                hold_time=plan.hold_time,
                min_residency=plan.min_residency,
                aging=plan.aging,
            )
            effects: list[Effect] = []
            for name, slot in plan.slots.items():
                if name not in self.sched.slots:
                    self.sched.add_unit(slot.spec)
                elif self.sched.slots[name].spec != slot.spec:
                    effects += self.sched.respec(slot.spec, self.clock())
            for name, slot in list(self.sched.slots.items()):  # models found while running
                base = plan.slots.get(slot.spec.group)
                if name in plan.slots or base is None or slot.spec.model is None:
                    continue
                spec = model_spec(base.spec, slot.spec.model, declared=None, learned=None)
                if spec != slot.spec:
                    effects += self.sched.respec(spec, self.clock())
            self._apply(effects)
        self.units.reconfigure(config)
        if self.units.per_model and not self._models_followed and self._tg is not None:
            self._models_followed = True
            self._tg.start_soon(self.units.follow_all)

    def draining(self, backend: str) -> None:
        """``backend`` is going away: its queued requests and every new one are refused (503,
        Retry-After); what was admitted finishes. :meth:`idle` says when it has."""
        self._draining.add(backend)
        units = set(self.sched.units_of(backend))
        for lease, pending in list(self._pending.items()):
            live = self.live.get(lease)
            if live is None or live.unit not in units or pending.answered:
                continue
            self._apply(self.sched.cancel(lease, self.clock()))  # leaves the queue cleanly
            self._carry_out([self._removed(lease, backend)])

    def _removed(self, lease: int, backend: str) -> Refuse:
        return Refuse(lease, backend, 503, "backend_removed", REMOVED.format(backend), 5.0)

    def idle(self, backend: str) -> bool:
        """Whether nothing of ``backend`` is in flight: no lease, job, queued request or plan
        on any of its units (when a reload may restart its worker, or forget it)."""
        sched = self.sched
        if any(live.backend == backend for live in self.live.values()):
            return False
        return not any(
            sched.slots[u].busy or sched.slots[u].plan is not None or sched.queued(u)
            for u in sched.units_of(backend)
        )

    async def welcome(self, backend: str) -> None:
        """A backend a reload added: it may hold VRAM until its strategy says what it holds
        (asked now, bounded, as at start-up); a request that came meanwhile decides instead."""
        self._apply(self.sched.reconciled(backend, None, self.clock()))
        resident: bool | None = None
        with anyio.move_on_after(self.config.unload_timeout):
            try:
                resident = await self.strategies[backend].resident()
            except Exception as exc:  # a service that is down is simply unknown
                log.info("%s: cannot tell what it holds (%s)", backend, exc)
        slot = self.sched.slots.get(backend)
        if slot is None or slot.state is not State.UNKNOWN or slot.plan is not None or slot.busy:
            return
        self._apply(self.sched.reconciled(backend, resident, self.clock()))
        if backend in self.units.per_model:
            await self.units.follow(backend)

    def remove(self, backend: str) -> None:
        """Forget a drained ``backend`` (RuntimeError while it is in use); its strategy goes
        with the next :meth:`reconfigure`."""
        self.sched.remove_backend(backend)
        self._draining.discard(backend)
        self.counters.pop(backend, None)
        self.measured.pop(backend, None)
