"""The VRAM scheduler: it decides, it never does I/O.

Callers feed it events — a request arrived, a lease ended, a client left, an unload finished, the
clock moved — and it answers with *effects* to carry out (the values in
:mod:`~gpubroker.scheduling.effects`): admit or refuse a lease, wait for a backend to go idle,
unload it, load the next one. Every method is synchronous and runs to the end without awaiting,
so on one event loop there is exactly one writer at a time and no lock; and every decision can be
replayed in a unit test with a fake clock.

What it places are *units*: a backend as a whole, or under ``policy: budget`` one model of
a backend that loads and frees models one by one (Ollama), named ``backend/model``. Such a
backend keeps its own unit too, for what cannot be told apart by model (a request naming none,
memory held before we knew what). Each GPU is a domain with a capacity, less the memory held
by processes no backend owns. A unit needs some of it on each of its GPUs: the largest of its
declared (or learned) footprint, the estimate its requests brought (a longer context, a
workflow's files) and what telemetry measured, under ``policy: budget``; the whole GPU under
``policy: exclusive``, or when nothing about it is known.

A request is admitted at once when its unit is resident and has room for what it asks;
otherwise a *plan* makes room: victims (chosen by
:func:`~gpubroker.scheduling.victims.choose_victims`, or the chooser given) are drained — no
new leases, in-flight ones finish, ``busy()`` must say idle — then unloaded, then the target is
loaded and its queued requests are admitted together. A resident unit may be its own victim: a
ComfyUI whose cache plus a workflow's new files would not fit is freed first, then serves it.
Units named in each other's ``exclusive`` are never resident together. Plans on disjoint GPUs
run side by side.

A unit moves through these states::

    unknown ──► absent ──► loading ──► resident ──► draining ──► unloading ──► absent / asleep
                  ▲                                                               │
                  └───────────────────────────────────────────────────────────────┘

The class is in three modules so each reads alone: this one holds the state and takes the
events, :mod:`~gpubroker.scheduling.planning` decides (the pump every event ends with),
:mod:`~gpubroker.scheduling.sizing` does the arithmetic. Nothing an event does walks the whole
queue (issue 16, ``bench/scheduler_cost.py``): the waiters are indexed by unit with their
deadlines in a heap (:mod:`~gpubroker.scheduling.waitqueue`), the units by GPU, conflict and
idle timeout (:mod:`~gpubroker.scheduling.unitindex`), the leases admitted by lease.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping

from gpubroker.config.model import Policy
from gpubroker.errors import SwapInProgress
from gpubroker.scheduling.effects import Effect, Note, Refuse, Unload
from gpubroker.scheduling.planning import Planning
from gpubroker.scheduling.slots import (
    HOLDS_VRAM,
    SHOWN_ORDER,
    BackendSpec,
    Chooser,
    Plan,
    Slot,
    Source,
    State,
    Waiter,
)
from gpubroker.scheduling.unitindex import UnitIndex, conflicts
from gpubroker.scheduling.victims import choose_victims
from gpubroker.scheduling.waitqueue import WaitQueue

__all__ = ["HOLDS_VRAM", "BackendSpec", "Chooser", "Scheduler", "Source", "State"]


class Scheduler(Planning):
    """The scheduler for every GPU domain of one broker. Times are seconds on any clock."""

    def __init__(
        self,
        backends: Iterable[BackendSpec | tuple[str, int | None]],
        *,
        capacities: Mapping[str, int | None] | None = None,
        policy: Policy = "exclusive",
        queue_timeout: float = 120.0,
        hold_time: float = 10.0,
        min_residency: float = 0.0,
        aging: float = 30.0,
        choose: Chooser = choose_victims,
    ) -> None:
        specs = [
            b if isinstance(b, BackendSpec) else BackendSpec(b[0], max_concurrency=b[1])
            for b in backends
        ]
        self.slots = {s.name: Slot(s) for s in specs}
        self.children: dict[str, list[str]] = {}  # backend -> its model units
        for s in specs:
            if s.group:
                self.children.setdefault(s.group, []).append(s.name)
        gpus = {g for s in specs for g in s.gpus}
        caps = dict(capacities or {})
        self.capacity: dict[str, int | None] = {g: caps.get(g) for g in sorted(gpus)}
        self.policy: Policy = policy
        self.queue_timeout = queue_timeout
        self.hold_time = hold_time
        self.min_residency = min_residency
        self.aging = aging
        self.choose = choose
        self.unowned: dict[str, int] = {}  # GPU -> bytes held by processes no backend owns
        self.queue = WaitQueue()  # iterates in arrival order, as the list it replaced did
        self.index = UnitIndex(self.slots)  # by GPU, by conflict, by idle timeout
        self._holders: dict[int, Slot] = {}  # lease admitted -> the unit it holds
        self.plans: dict[int, Plan] = {}
        self.hold_until: dict[str, float] = {}
        self.swap_count = 0
        self.last_swap_at: float | None = None
        self._wake_at: float | None = None  # minimum-residency or idle-timeout deadline
        self._pumped_at = float("-inf")  # when the queue was last pumped
        self._ids = itertools.count(1)

    # --- units --------------------------------------------------------------------------

    def add_unit(self, spec: BackendSpec) -> None:
        """A unit found after start-up (a model first asked for, or seen loaded): absent until
        told otherwise. Its GPUs must be ones the scheduler already plans for.

        (A unit removed, or its spec replaced with other GPUs, conflicts or idle timeout,
        calls ``self.index.rebuild(self.slots)`` once it is done: see ``unitindex``.)"""
        if spec.name in self.slots:
            return
        slot = self.slots[spec.name] = Slot(spec, state=State.ABSENT)
        if spec.group:
            self.children.setdefault(spec.group, []).append(spec.name)
        self.index.add(slot, self.slots)

    def units_of(self, backend: str) -> list[str]:
        """The backend's own unit, then its model units."""
        return [backend, *self.children.get(backend, ())]

    def backend_state(self, backend: str) -> State:
        """One state for a backend and its model units: the busiest word among them (a swap
        step, else resident, asleep, unknown, absent)."""
        states = {self.slots[u].state for u in self.units_of(backend)}
        for state in SHOWN_ORDER:
            if state in states:
                return state
        return State.ABSENT

    def _conflicts(self, a: BackendSpec, b: BackendSpec) -> bool:
        """Whether ``a`` and ``b`` may never be resident together (either side names it)."""
        return conflicts(a, b)

    # --- sizes ----------------------------------------------------------------------------

    def settle(self, unit: str) -> None:
        """``unit`` is idle and its service just said what it holds: that reading, not the most
        its requests asked since it loaded, is its size now (a long context's cache may be gone
        with a reload)."""
        slot = self.slots[unit]
        if slot.state is State.RESIDENT and not slot.busy and slot.plan is None and slot.measured:
            slot.estimate = None

    def learned(self, unit: str, nbytes: int) -> None:
        """What ``unit`` was measured to take while resident becomes its footprint for later
        loads, unless its own is declared (a backend's ``vram`` standing in gives way)."""
        slot = self.slots[unit]
        if slot.spec.source != "declared" and nbytes > 0:
            slot.spec = dataclasses.replace(slot.spec, need=nbytes, source="measured")

    def unmanaged(self, gpu: str, nbytes: int, now: float) -> list[Effect]:
        """Telemetry saw processes no backend owns hold ``nbytes`` on ``gpu``. Under the budget
        policy that memory is not ours to plan with; when it grows past what is free, the
        cheapest residents are reclaimed (see ``_pump``) rather than waiting for an OOM."""
        if gpu not in self.capacity or self.policy != "budget":
            return []
        if self.unowned.get(gpu, 0) == nbytes:
            return []
        self.unowned[gpu] = nbytes
        return self._pump(now)

    def measured(self, backend: str, gpu: str, nbytes: int | None, now: float) -> list[Effect]:
        """Telemetry saw ``backend`` hold ``nbytes`` on ``gpu`` (None: cannot tell).

        A size that changed may let a waiter in, or call for more room: the queue is pumped.
        """
        slot = self.slots[backend]
        if gpu not in slot.spec.gpus:
            return []
        before = self.size(backend, gpu)
        if nbytes is None:
            slot.measured.pop(gpu, None)
        else:
            slot.measured[gpu] = nbytes
        return self._pump(now) if self.size(backend, gpu) != before else []

    # --- questions ------------------------------------------------------------------------

    def state(self, backend: str) -> State:
        return self.slots[backend].state

    def active(self, backend: str) -> int:
        return len(self.slots[backend].active)

    def jobs_of(self, backend: str) -> int:
        return self.slots[backend].jobs

    def in_flight(self, backend: str) -> int:
        """Leases plus the service's own jobs: what counts toward hold, drain and limits."""
        return self.slots[backend].busy

    def queued(self, backend: str | None = None) -> int:
        return self.queue.count(backend)

    def resident_units(self) -> list[str]:
        """Units admitting now, most recently used first."""
        live = [s for s in self.slots.values() if s.state is State.RESIDENT]
        return [s.name for s in sorted(live, key=lambda s: -s.last_used)]

    def residents(self) -> list[str]:
        """Backends with a unit admitting now, most recently used first."""
        out = dict.fromkeys(self.slots[u].spec.backend for u in self.resident_units())
        return list(out)

    @property
    def owner(self) -> str | None:
        """OneGPU4All's single owner: the backend most recently used, if any is resident."""
        residents = self.residents()
        return residents[0] if residents else None

    @property
    def swapping(self) -> bool:
        """Whether a plan (a swap, an unload) is in progress on any GPU."""
        return bool(self.plans)

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do."""
        oldest = self.queue.oldest()
        times = [oldest.since + self.queue_timeout] if oldest is not None else []
        # A hold already past (a waiter behind another plan on its GPU) needs no tick: the
        # plan's own end pumps the queue again.
        times += (t for t in self.hold_until.values() if t > self._pumped_at)
        if self._wake_at is not None:
            times.append(self._wake_at)
        for s in self.index.idlers:
            if s.spec.idle_timeout is not None and s.state is State.RESIDENT and not s.busy:
                # Past, yet the last pump kept it (it has waiters, or its GPU is in a plan):
                # whatever ends that pumps again.
                due = s.last_used + s.spec.idle_timeout
                if due > self._pumped_at:
                    times.append(due)
        return min(times) if times else None

    # --- events ---------------------------------------------------------------------------

    def reconciled(self, backend: str, resident: bool | None, now: float = 0.0) -> list[Effect]:
        """Start-up: what the unit's strategy says it holds (None = cannot tell)."""
        slot = self.slots[backend]
        slot.state = {True: State.RESIDENT, False: State.ABSENT, None: State.UNKNOWN}[resident]
        if resident:
            slot.loaded_at = slot.last_used = now
        return [Note("reconciled", backend, detail={"state": slot.state.value})]

    def observed(self, unit: str, resident: bool, now: float) -> list[Effect]:
        """The service says what it holds now (Ollama's ``/api/ps``): a model it loaded for a
        client of its own is resident; one it let go by itself (its keep-alive ran out) is
        absent. Only a unit at rest changes: one in a plan, or serving, is the plan's."""
        slot = self.slots[unit]
        if slot.plan is not None or slot.busy:
            return []
        if resident and slot.state in (State.ABSENT, State.ASLEEP, State.UNKNOWN):
            slot.state = State.RESIDENT
            slot.loaded_at = slot.last_used = now
        elif not resident and slot.state in (State.RESIDENT, State.UNKNOWN):
            slot.state = State.ABSENT
            slot.estimate = None
        else:
            return []
        note = Note("reconciled", unit, detail={"state": slot.state.value})
        return [note, *self._pump(now)]

    def request(
        self,
        lease: int,
        backend: str,
        now: float,
        need: int | None = None,
        fresh: int | None = None,
    ) -> list[Effect]:
        """A GPU request for unit ``backend`` wants a lease; ``need``: the bytes it asks the
        unit to hold (its context's KV cache, its workflow's files), when known; ``fresh``:
        what it would need with the unit freed first (less than ``need``: a cache dropped)."""
        slot = self.slots[backend]
        # A hold that just ran out starts its plan first, so its victims stop admitting.
        effects: list[Effect] = self._pump(now) if self._hold_over(now) else []
        if self._may_admit(slot) and not self.queued(backend) and self._room_for(slot, need):
            return [*effects, self._admit(lease, slot, now, need=need)]
        never = self._never_fits(backend, need if fresh is None else fresh)
        if never:
            return [*effects, Refuse(lease, backend, 507, "never_fits", never)]
        self.queue.append(Waiter(lease, backend, now, need, fresh))
        effects.append(Note("queued", backend, lease, {"position": len(self.queue)}))
        return effects + self._pump(now)

    def _hold_over(self, now: float) -> bool:
        return any(now >= until for until in self.hold_until.values())

    def released(self, lease: int, now: float) -> list[Effect]:
        """A lease ended: its response was fully sent, or its client went away."""
        slot = self._holders.pop(lease, None)
        if slot is None or lease not in slot.active:
            return []
        slot.active.discard(lease)
        slot.last_used = now
        return [Note("released", slot.name, lease), *self._pump(now)]

    def jobs(self, backend: str, count: int, now: float) -> list[Effect]:
        """The service reports ``count`` jobs of its own queued or running (ComfyUI's queue).

        They are GPU work in flight as much as a lease is: they keep the owner active through
        its hold, a victim drains until they end, and they take ``maxConcurrency`` slots.
        """
        slot = self.slots[backend]
        if count or slot.jobs:  # a job running or just ended is a use: idle time starts now
            slot.last_used = now
        if count == slot.jobs:
            return []
        slot.jobs = count
        return self._pump(now)

    def cancel(self, lease: int, now: float) -> list[Effect]:
        """The client of ``lease`` went away: leave the queue, or end the lease if admitted."""
        waiter = self.queue.get(lease)
        if waiter is not None:
            self.queue.remove(waiter)
            return [Note("left", waiter.backend, lease), *self._after_leave(now)]
        return self.released(lease, now)

    def refuse_all(self, status: int, code: str, message: str, now: float) -> list[Effect]:
        """Answer every waiter at once (the broker is stopping): nobody waits out the grace."""
        effects: list[Effect] = [
            Refuse(w.lease, w.backend, status, code, message, retry_after=5.0) for w in self.queue
        ]
        self.queue.clear()
        return effects + self._after_leave(now)

    def tick(self, now: float) -> list[Effect]:
        """The clock moved: time out waiters past ``queue_timeout``, end expired holds."""
        effects: list[Effect] = []
        expired = self.queue.take_expired(now, self.queue_timeout)
        for waiter in expired:
            effects.append(
                Refuse(
                    waiter.lease,
                    waiter.backend,
                    503,
                    "queue_timeout",
                    f"waited {now - waiter.since:.1f}s for the GPU (queueTimeout "
                    f"{self.queue_timeout:g}s); try again",
                    retry_after=max(1.0, min(self.queue_timeout, 30.0)),
                )
            )
        if expired:
            effects += self._after_leave(now)
        return effects + self._pump(now)

    def idle(self, swap: int, backend: str, now: float) -> list[Effect]:
        """A drained victim's ``busy()`` said idle: unload it."""
        plan = self.plans.get(swap)
        if plan is None or backend not in plan.victims or backend in plan.idle:
            return []
        plan.idle.add(backend)
        self.slots[backend].state = State.UNLOADING
        plan.unload_started = True
        if plan.idle >= set(plan.victims):
            plan.drained_at = now
        return [Note("unloading", backend, detail={"swap": swap}), Unload(swap, backend)]

    def unloaded(
        self, swap: int, backend: str, error: str | None, now: float, *, holding: bool = False
    ) -> list[Effect]:
        """A victim's unload finished; with ``error`` it failed or timed out (the plan goes on).

        ``holding``: telemetry saw the victim keep its memory, so it still counts as resident;
        if the target then does not fit, the plan is dropped and the queue planned afresh.
        """
        plan = self.plans.get(swap)
        if plan is None or backend not in plan.victims:
            return []
        plan.gone.add(backend)
        slot = self.slots[backend]
        if holding:
            slot.state = State.RESIDENT
            if backend == plan.target:  # freeing it did not help: this request asks no more
                for w in self.queue.of(backend):
                    w.fresh = None
        else:
            slot.state = State.ASLEEP if slot.spec.sleeps and error is None else State.ABSENT
            slot.estimate = None
            if backend == plan.target:  # freed to serve afresh: its cache no longer counts
                slot.measured.clear()
                for w in self.queue.of(backend):
                    if w.fresh is not None:
                        w.need, w.fresh = w.fresh, None
        if backend != plan.target:
            slot.plan = None
        detail: dict[str, object] = {"error": error, "swap": swap, "holding": holding}
        effects: list[Effect] = [Note("unloaded", backend, detail=detail)]
        if error:
            plan.failures.append(f"{backend}: {error}")
        if plan.gone < set(plan.victims):
            return effects
        plan.unloaded_at = now
        target = plan.target
        if target is None:
            return effects + self._finish(plan, now) + self._pump(now)
        slot = self.slots[target]
        want = self._want(target)
        resident = slot.state is State.RESIDENT  # it grows in place, or kept what it was to free
        if resident and self._room_for(slot, want):
            return effects + self._finish(plan, now) + self._pump(now)
        if not resident and self._fits(target, want):
            return [*effects, *self._load(plan)]
        # A victim kept its memory: loading (or growing) now could OOM, and the plan did not
        # do what it promised. Planned afresh; the unit itself is not freed again for it.
        del self.plans[plan.id]
        slot.plan = None
        effects.append(
            Note("swap_failed", target, detail={"swap": plan.id, "failures": plan.failures})
        )
        return effects + self._pump(now)

    def loaded(self, swap: int, backend: str, error: str | None, now: float) -> list[Effect]:
        """The target's ``load()`` finished; with ``error`` it could not be brought up."""
        plan = self.plans.get(swap)
        if plan is None or plan.target != backend:
            return []
        if error is None:
            return self._finish(plan, now) + self._pump(now)
        plan.failures.append(f"{backend}: {error}")
        slot = self.slots[backend]
        slot.state = State.UNKNOWN
        slot.plan = None
        slot.estimate = None
        del self.plans[plan.id]
        effects: list[Effect] = [
            Note("load_failed", backend, detail={"error": error, "swap": swap})
        ]
        for waiter in self.queue.of(backend):
            self.queue.remove(waiter)
            effects.append(
                Refuse(
                    waiter.lease,
                    backend,
                    502,
                    "load_failed",
                    f"{backend} could not be made ready: {error}",
                )
            )
        return effects + self._pump(now)

    def evict(
        self, backend: str | None, force: bool, now: float, reason: str = "admin"
    ) -> tuple[int | None, list[Effect]]:
        """Free ``backend`` (every backend when None) now; ``force`` skips the drain.

        Returns the plan id to wait for (None when there was nothing to do) and the effects.
        Raises ``SwapInProgress`` while a plan touches the same GPUs.
        """
        names = self.units_of(backend) if backend else list(self.slots)
        victims = [n for n in names if self.slots[n].state in HOLDS_VRAM]
        if not victims:
            return None, []
        gpus = frozenset(g for n in victims for g in self.slots[n].spec.gpus)
        busy = [p for p in self.plans.values() if p.gpus & gpus]
        if busy:
            raise SwapInProgress(busy[0].target, backend=backend)
        plan, effects = self._start(None, victims, gpus, now, force=force, reason=reason)
        return plan.id, effects

    # --- reload (``gpubroker reload``): the config changed under a running broker ----------
    # ``self.index`` (units by GPU, conflict and idle timeout) follows ``add_unit`` by itself;
    # ``respec`` (a changed rule or idle timeout) and ``remove_backend`` rebuild it. The queue
    # needs nothing: a unit's index there exists only while it has waiters.

    def respec(self, spec: BackendSpec, now: float) -> list[Effect]:
        """Unit ``spec.name``'s new spec, for decisions from now on (a changed size, priority,
        limit, idle timeout, cost or rule); what it holds and serves is unchanged. A footprint
        learned while running stays unless the new spec declares one. Its GPUs cannot change
        (ValueError): they are fixed at start-up."""
        slot = self.slots[spec.name]
        if spec.gpus != slot.spec.gpus:
            raise ValueError(f"{spec.name}: its GPUs cannot change while running")
        if spec.source != "declared" and slot.spec.source == "measured":
            spec = dataclasses.replace(spec, need=slot.spec.need, source="measured")
        slot.spec = spec
        self.index.rebuild(self.slots)
        return self._pump(now)

    def remove_backend(self, backend: str) -> None:
        """Forget ``backend`` and its model units. Refused (RuntimeError) while any of them
        holds a lease or a job, has a request queued or is in a plan: drain it first."""
        units = self.units_of(backend)
        for unit in units:
            slot = self.slots[unit]
            if slot.busy or slot.plan is not None or self.queued(unit):
                raise RuntimeError(f"{unit} is still in use: drain it before removing it")
        for unit in units:
            del self.slots[unit]
        self.children.pop(backend, None)
        self.index.rebuild(self.slots)

    def retune(
        self, *, queue_timeout: float, hold_time: float, min_residency: float, aging: float
    ) -> None:
        """New timings, for every decision from now on (requests already queued included)."""
        self.queue_timeout = queue_timeout
        self.hold_time = hold_time
        self.min_residency = min_residency
        self.aging = aging
