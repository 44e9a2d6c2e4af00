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
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gpubroker.config.model import Policy
from gpubroker.errors import SwapInProgress
from gpubroker.scheduling.effects import (
    Admit,
    CancelSwap,
    Effect,
    Load,
    Note,
    Refuse,
    SwapDone,
    SwapInfo,
    Unload,
    WaitIdle,
)
from gpubroker.scheduling.victims import Candidate, choose_victims

Chooser = Callable[[int, Sequence[Candidate], float], list[str] | None]
"""Which candidates free ``shortfall`` bytes (given the time now), or None: the victim rule."""
Source = Literal["declared", "backend", "measured", "unknown"]
"""Where a unit's own footprint comes from: its config (``declared``), its backend's ``vram``
standing in for a model's (``backend``), an earlier measurement (``measured``), or nowhere."""


class State(enum.Enum):
    UNKNOWN = "unknown"  # may hold VRAM; we could not tell at start-up
    ABSENT = "absent"
    ASLEEP = "asleep"  # freed its VRAM by sleeping; wakes faster than a cold load
    LOADING = "loading"
    RESIDENT = "resident"
    DRAINING = "draining"  # victim of a plan: no new leases, waiting for in-flight ones
    UNLOADING = "unloading"


HOLDS_VRAM = frozenset(
    {State.UNKNOWN, State.LOADING, State.RESIDENT, State.DRAINING, State.UNLOADING}
)
# The state a backend shows when its units differ: the first of these any of them is in.
_SHOWN_ORDER = (
    State.LOADING,
    State.UNLOADING,
    State.DRAINING,
    State.RESIDENT,
    State.UNKNOWN,
    State.ASLEEP,
    State.ABSENT,
)


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """What the scheduler knows of a unit. ``need`` in bytes per GPU; None = unknown (the
    whole GPU until a request or telemetry tells more); ``source`` says where it came from.

    ``cost`` ranks how cheap the unit is to evict and bring back: 1 (vLLM, which wakes in
    seconds), 2 (a cold load), 3 (a process to restart). ``sleeps`` says what its unload does
    and so what state follows (asleep rather than absent): a different fact, not inferred from
    the rank. ``group`` and ``model``: the backend and model of a model unit (empty for a
    backend's own unit). ``exclusive``: units, or backends (all their units), never resident
    together with this one.
    """

    name: str
    gpus: tuple[str, ...] = ("0",)
    need: int | None = None
    priority: int = 0
    pinned: bool = False
    max_concurrency: int | None = None
    cost: int = 2
    idle_timeout: float | None = None
    sleeps: bool = False  # its unload is a sleep: afterwards it is asleep, not absent
    group: str = ""
    model: str | None = None
    exclusive: frozenset[str] = frozenset()
    source: Source = "declared"

    @property
    def backend(self) -> str:
        """The backend this unit belongs to (itself for a backend's own unit)."""
        return self.group or self.name


# --- state -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    spec: BackendSpec
    state: State = State.UNKNOWN
    active: set[int] = field(default_factory=set)
    last_used: float = 0.0
    loaded_at: float = float("-inf")
    plan: int | None = None  # the plan this backend is a victim or target of
    measured: dict[str, int] = field(default_factory=dict)  # GPU -> bytes telemetry saw held
    jobs: int = 0  # work the service accepted and runs after its HTTP call ended (ComfyUI)
    estimate: int | None = None  # the most its admitted requests asked for since it loaded

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def busy(self) -> int:
        """GPU work in flight: leases held plus the service's own queued and running jobs."""
        return len(self.active) + self.jobs

    @property
    def has_room(self) -> bool:
        limit = self.spec.max_concurrency
        return limit is None or self.busy < limit


@dataclass(slots=True)
class _Waiter:
    """A queued request. ``backend`` is its unit; ``need``: bytes it asks its unit to hold
    (None: the unit's footprint); ``fresh``: what it would need were its unit freed first
    (a ComfyUI cache), where that is less."""

    lease: int
    backend: str
    since: float
    need: int | None = None
    fresh: int | None = None


@dataclass(slots=True)
class _Plan:
    id: int
    target: str | None
    victims: list[str]
    gpus: frozenset[str]
    started: float
    reason: str = "request"
    force: bool = False
    asked: set[str] = field(default_factory=set)  # victims sent to the idle check
    idle: set[str] = field(default_factory=set)  # victims whose busy() said idle
    gone: set[str] = field(default_factory=set)  # victims unloaded (or failed trying)
    failures: list[str] = field(default_factory=list)
    prior: dict[str, State] = field(default_factory=dict)  # victims' states before the drain
    drained_at: float | None = None
    unloaded_at: float | None = None
    unload_started: bool = False


class Scheduler:
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
        self.slots = {s.name: _Slot(s) for s in specs}
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
        self.queue: list[_Waiter] = []
        self.plans: dict[int, _Plan] = {}
        self.hold_until: dict[str, float] = {}
        self.swap_count = 0
        self.last_swap_at: float | None = None
        self._wake_at: float | None = None  # minimum-residency or idle-timeout deadline
        self._pumped_at = float("-inf")  # when the queue was last pumped
        self._ids = itertools.count(1)

    # --- units --------------------------------------------------------------------------

    def add_unit(self, spec: BackendSpec) -> None:
        """A unit found after start-up (a model first asked for, or seen loaded): absent until
        told otherwise. Its GPUs must be ones the scheduler already plans for."""
        if spec.name in self.slots:
            return
        self.slots[spec.name] = _Slot(spec, state=State.ABSENT)
        if spec.group:
            self.children.setdefault(spec.group, []).append(spec.name)

    def units_of(self, backend: str) -> list[str]:
        """The backend's own unit, then its model units."""
        return [backend, *self.children.get(backend, ())]

    def backend_state(self, backend: str) -> State:
        """One state for a backend and its model units: the busiest word among them (a swap
        step, else resident, asleep, unknown, absent)."""
        states = {self.slots[u].state for u in self.units_of(backend)}
        for state in _SHOWN_ORDER:
            if state in states:
                return state
        return State.ABSENT

    def _conflicts(self, a: BackendSpec, b: BackendSpec) -> bool:
        """Whether ``a`` and ``b`` may never be resident together (either side names it)."""
        return (
            bool({b.name, b.backend} & a.exclusive or {a.name, a.backend} & b.exclusive)
            and a.name != b.name
        )

    # --- sizes ----------------------------------------------------------------------------

    def size(self, backend: str, gpu: str, need: int | None = None) -> int:
        """Bytes unit ``backend`` takes on ``gpu`` when resident (the whole GPU where unknown);
        with ``need``, once a request asking for that much is admitted too.

        The largest of the declared (or learned) footprint, the estimate its requests brought
        and what telemetry measured.
        """
        cap = self.capacity[gpu]
        if self.policy == "exclusive" or cap is None:
            return cap if cap is not None else 1
        known = self._known_size(backend, gpu, need)
        if known is not None:
            return known
        # Nothing known (what it held before it left is no measure of what it will): all the
        # card has for it, which memory nobody owns is not, nor what pinned units hold.
        pinned = sum(
            self._known_size(s.name, gpu) or 0
            for s in self.slots.values()
            if s.spec.pinned and s.name != backend and s.state in HOLDS_VRAM and gpu in s.spec.gpus
        )
        return max(1, cap - self.unowned.get(gpu, 0) - pinned)

    def _known_size(self, unit: str, gpu: str, need: int | None = None) -> int | None:
        """``size`` where something is known of it (budget policy, a known capacity), else
        None."""
        slot = self.slots[unit]
        known = [n for n in (slot.spec.need, slot.estimate, need) if n is not None]
        held = slot.measured.get(gpu)
        if not known and (held is None or slot.state not in HOLDS_VRAM):
            return None
        return max([*known, held or 0])

    def footprint(self, unit: str, gpu: str) -> tuple[int, str]:
        """What ``unit`` is planned to take on ``gpu`` and where that figure comes from:
        ``declared`` (config), ``learned`` (measured on an earlier run), ``estimated`` (what its
        requests asked: a context's KV cache, a workflow's files), ``measured`` (telemetry,
        now) or ``unknown`` (the whole GPU, until something is known)."""
        size = self.size(unit, gpu)
        slot = self.slots[unit]
        if self.policy == "exclusive" or self.capacity[gpu] is None:
            return size, "exclusive"
        if slot.measured.get(gpu, 0) >= size and size:
            return size, "measured"
        if slot.estimate is not None and slot.estimate >= size:
            return size, "estimated"
        if slot.spec.need is None:
            return size, "unknown"
        shown = {"measured": "learned", "backend": "declared"}
        return size, shown.get(slot.spec.source, slot.spec.source)

    def _fresh_size(self, unit: str, gpu: str, need: int | None) -> int:
        """What ``unit`` would take on ``gpu`` loaded afresh for a request asking ``need``
        (nothing it held before counts: not its estimate, not what was measured)."""
        cap = self.capacity[gpu]
        if self.policy == "exclusive" or cap is None:
            return cap if cap is not None else 1
        known = [n for n in (self.slots[unit].spec.need, need) if n is not None]
        return max(known) if known else cap

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

    def _cap(self, gpu: str) -> int:
        cap = self.capacity[gpu]
        return cap if cap is not None else 1

    def used(self, gpu: str) -> int:
        """Bytes planned as taken on ``gpu``: every unit holding memory, and what nobody owns."""
        return self.unowned.get(gpu, 0) + sum(
            self.size(s.name, gpu)
            for s in self.slots.values()
            if gpu in s.spec.gpus and s.state in HOLDS_VRAM
        )

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
        return sum(1 for w in self.queue if backend is None or w.backend == backend)

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
        times = [w.since + self.queue_timeout for w in self.queue]
        # A hold already past (a waiter behind another plan on its GPU) needs no tick: the
        # plan's own end pumps the queue again.
        times += (t for t in self.hold_until.values() if t > self._pumped_at)
        if self._wake_at is not None:
            times.append(self._wake_at)
        for s in self.slots.values():
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
        self.queue.append(_Waiter(lease, backend, now, need, fresh))
        effects.append(Note("queued", backend, lease, {"position": len(self.queue)}))
        return effects + self._pump(now)

    def _hold_over(self, now: float) -> bool:
        return any(now >= until for until in self.hold_until.values())

    def released(self, lease: int, now: float) -> list[Effect]:
        """A lease ended: its response was fully sent, or its client went away."""
        for slot in self.slots.values():
            if lease in slot.active:
                slot.active.discard(lease)
                slot.last_used = now
                return [Note("released", slot.name, lease), *self._pump(now)]
        return []

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
        for i, waiter in enumerate(self.queue):
            if waiter.lease == lease:
                del self.queue[i]
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
        expired = [w for w in self.queue if now - w.since >= self.queue_timeout]
        for waiter in expired:
            self.queue.remove(waiter)
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
                for w in self.queue:
                    if w.backend == backend:
                        w.fresh = None
        else:
            slot.state = State.ASLEEP if slot.spec.sleeps and error is None else State.ABSENT
            slot.estimate = None
            if backend == plan.target:  # freed to serve afresh: its cache no longer counts
                slot.measured.clear()
                for w in self.queue:
                    if w.backend == backend and w.fresh is not None:
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

    def _fits(self, backend: str, need: int | None = None) -> bool:
        """Whether unit ``backend``, asked for ``need``, fits beside what is planned."""
        holds = self.slots[backend].state in HOLDS_VRAM
        return all(
            self.used(g) - (self.size(backend, g) if holds else 0) + self.size(backend, g, need)
            <= self._cap(g)
            for g in self.slots[backend].spec.gpus
        )

    def _room_for(self, slot: _Slot, need: int | None) -> bool:
        """Whether a request asking ``need`` of the resident ``slot`` fits as it stands: it
        asks no more than the unit is sized for, or the growth fits."""
        if need is None:
            return True
        gpus = slot.spec.gpus
        if all(self.size(slot.name, g, need) <= self.size(slot.name, g) for g in gpus):
            return True
        return self._fits(slot.name, need)

    def _want(self, unit: str) -> int | None:
        """What the first request queued for ``unit`` asks of it."""
        return next((w.need for w in self.queue if w.backend == unit), None)

    def _load(self, plan: _Plan) -> list[Effect]:
        """Bring the plan's target up; the note says whether it wakes from sleep."""
        assert plan.target is not None
        slot = self.slots[plan.target]
        wake = slot.state is State.ASLEEP
        slot.state = State.LOADING
        detail: dict[str, object] = {"wake": wake, "swap": plan.id}
        return [Note("loading", plan.target, detail=detail), Load(plan.id, plan.target)]

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
        for waiter in [w for w in self.queue if w.backend == backend]:
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

    # --- decisions ------------------------------------------------------------------------

    def _may_admit(self, slot: _Slot) -> bool:
        return slot.state is State.RESIDENT and slot.plan is None and self._has_room(slot)

    def _has_room(self, slot: _Slot) -> bool:
        """``maxConcurrency`` counts the backend's work over all its units."""
        limit = slot.spec.max_concurrency
        if limit is None:
            return True
        group = slot.spec.backend
        if group not in self.children:
            return slot.busy < limit
        return sum(self.slots[u].busy for u in self.units_of(group)) < limit

    def _admit(
        self,
        lease: int,
        slot: _Slot,
        now: float,
        swap: SwapInfo | None = None,
        need: int | None = None,
    ) -> Admit:
        slot.active.add(lease)
        slot.last_used = now
        if need is not None:
            slot.estimate = max(slot.estimate or 0, need)
        return Admit(lease, slot.name, swap)

    def _never_fits(self, backend: str, need: int | None = None) -> str | None:
        """Why ``backend`` asked for ``need`` can never be admitted, or None (pinned residents
        are immovable, and so is a pinned unit it may not be resident with)."""
        spec = self.slots[backend].spec
        for s in self.slots.values():
            if s.spec.pinned and s.state in HOLDS_VRAM and self._conflicts(spec, s.spec):
                return (
                    f"{backend} may not be resident with {s.name} (exclusiveWith), which is "
                    "pinned: it can never be loaded"
                )
        for gpu in spec.gpus:
            cap = self._cap(gpu)
            pinned = sum(
                self.size(s.name, gpu)
                for s in self.slots.values()
                if s.name != backend
                and s.spec.pinned
                and gpu in s.spec.gpus
                and s.state in HOLDS_VRAM
            )
            fresh = need is not None
            asks = self._fresh_size(backend, gpu, need) if fresh else self.size(backend, gpu)
            if asks > cap - pinned:
                gib = 2**30
                return (
                    f"{backend} needs {asks / gib:.1f} GiB on GPU {gpu}, which has "
                    f"{cap / gib:.1f} GiB with {pinned / gib:.1f} GiB pinned by others: it can "
                    "never fit"
                )
        return None

    def _after_leave(self, now: float) -> list[Effect]:
        """A waiter left. A plan still draining for nobody is abandoned: nothing was freed yet."""
        effects: list[Effect] = []
        for plan in list(self.plans.values()):
            if plan.target is None or plan.unload_started or self.queued(plan.target):
                continue
            for name in plan.victims:
                self.slots[name].state = plan.prior[name]
                self.slots[name].plan = None
            self.slots[plan.target].plan = None
            del self.plans[plan.id]
            effects += [
                CancelSwap(plan.id),
                Note("swap_abandoned", plan.target, detail={"swap": plan.id}),
            ]
        return effects + self._pump(now)

    def _pump(self, now: float) -> list[Effect]:
        """Admit what may be admitted; make room where a waiter needs it."""
        self._pumped_at = now
        effects: list[Effect] = []
        for plan in list(self.plans.values()):
            effects += self._drain_progress(plan, now)
        # 1. requests for resident backends, in arrival order
        for waiter in list(self.queue):
            slot = self.slots[waiter.backend]
            if (
                self._may_admit(slot)
                and self._first_waiter(waiter)
                and self._room_for(slot, waiter.need)
            ):
                self.queue.remove(waiter)
                effects.append(self._admit(waiter.lease, slot, now, need=waiter.need))
        # 2. targets needing room: highest aged priority first, one decision per GPU
        self._wake_at = None
        claimed = {g for p in self.plans.values() for g in p.gpus}
        holds: dict[str, float] = {}
        for target in self._targets(now):
            gpus = self._plan_gpus(target)
            if gpus & claimed:
                key = min(gpus)  # still waiting: its hold keeps running
                if key in self.hold_until:
                    holds[key] = self.hold_until[key]
                continue
            claimed |= gpus
            effects += self._make_room(target, gpus, now, holds)
        self.hold_until = holds
        # 3. idle timeouts
        for slot in self.slots.values():
            timeout = slot.spec.idle_timeout
            gpus = frozenset(slot.spec.gpus)
            if (
                timeout is not None
                and slot.state is State.RESIDENT
                and slot.plan is None
                and not slot.busy
                and not self.queued(slot.name)
                and not gpus & claimed
                and now >= slot.last_used + timeout
            ):
                claimed |= gpus
                _, started = self._start(None, [slot.name], gpus, now, reason="idle")
                effects += started
        # 4. memory nobody owns grew past what is free: reclaim, cheapest first
        for gpu, unowned in self.unowned.items():
            over = self.used(gpu) - self._cap(gpu)
            if not unowned or over <= 0 or gpu in claimed:
                continue
            candidates, _ = self._candidates(gpu, (), now, resident_only=True)
            chosen = self.choose(over, candidates, now)
            if not chosen:
                continue  # nothing movable covers it: requests wait for room instead
            gpus = frozenset(g for v in chosen for g in self.slots[v].spec.gpus)
            if gpus & claimed:
                continue
            claimed |= gpus
            _, started = self._start(None, chosen, gpus, now, reason="unmanaged")
            effects += started
        return effects

    def _plan_gpus(self, target: str) -> frozenset[str]:
        """The GPUs a plan for ``target`` touches: its own, and those of any unit it may not
        be resident with that holds memory now."""
        spec = self.slots[target].spec
        gpus = set(spec.gpus)
        for s in self.slots.values():
            if s.state in HOLDS_VRAM and self._conflicts(spec, s.spec):
                gpus |= set(s.spec.gpus)
        return frozenset(gpus)

    def _first_waiter(self, waiter: _Waiter) -> bool:
        return next(w for w in self.queue if w.backend == waiter.backend) is waiter

    def _targets(self, now: float) -> list[str]:
        """Backends with waiters that need room, by aged priority then arrival."""
        oldest: dict[str, float] = {}
        for w in self.queue:
            slot = self.slots[w.backend]
            if slot.plan is not None or w.backend in oldest:
                continue
            if slot.state is State.RESIDENT and (
                not self._first_waiter(w) or self._room_for(slot, w.need)
            ):
                continue  # admitting: it waits for its own requests, not for room
            oldest[w.backend] = w.since

        def key(name: str) -> tuple[float, float]:
            waited = now - oldest[name]
            aged = self.slots[name].spec.priority + (waited / self.aging if self.aging else 0)
            return (-aged, oldest[name])

        return sorted(oldest, key=key)

    def _candidates(
        self, gpu: str, exclude: Iterable[str], now: float, *, resident_only: bool = False
    ) -> tuple[list[Candidate], float | None]:
        """The units on ``gpu`` that could make room, and when the first still inside its
        minimum residency may go (None: none is)."""
        skip = set(exclude)
        out: list[Candidate] = []
        protected_until: float | None = None
        movable = (State.RESIDENT,) if resident_only else (State.RESIDENT, State.UNKNOWN)
        for s in self.slots.values():
            if s.name in skip or gpu not in s.spec.gpus:
                continue
            if s.state not in movable or s.plan is not None:
                continue
            young = s.state is State.RESIDENT and now < s.loaded_at + self.min_residency
            if young:
                until = s.loaded_at + self.min_residency
                protected_until = min(until, protected_until or until)
            out.append(
                Candidate(
                    name=s.name,
                    frees=self.size(s.name, gpu),
                    priority=s.spec.priority,
                    cost=s.spec.cost,
                    last_used=s.last_used,
                    pinned=s.spec.pinned,
                    protected=young,
                )
            )
        return out, protected_until

    def _make_room(
        self, target: str, gpus: frozenset[str], now: float, holds: dict[str, float]
    ) -> list[Effect]:
        """Load (or grow) ``target`` now if it fits; else pick victims and drain them when
        they may: first whatever it may not be resident with, then itself where freeing it
        first is what its request asks (``fresh``), then the cheapest others."""
        slot = self.slots[target]
        waiter = next(w for w in self.queue if w.backend == target)
        holding = slot.state in HOLDS_VRAM
        key = min(gpus)
        hold = self.hold_until.get(key, now + self.hold_time)  # runs from first blocked
        victims: list[str] = []
        protected_until: float | None = None
        for s in self.slots.values():
            if s.state in HOLDS_VRAM and self._conflicts(slot.spec, s.spec):
                young = s.state is State.RESIDENT and now < s.loaded_at + self.min_residency
                if s.plan is not None or s.spec.pinned or young:
                    if young:
                        self._wake_at = s.loaded_at + self.min_residency
                    holds[key] = hold
                    return []  # wait until it may go (a pinned one was refused on arrival)
                victims.append(s.name)
        flush = holding and waiter.fresh is not None and not self._fits(target, waiter.need)
        if flush:
            victims.insert(0, target)
        for gpu in sorted(gpus):
            freed = sum(self.size(v, gpu) for v in victims if gpu in self.slots[v].spec.gpus)
            if gpu not in slot.spec.gpus:
                adds = 0
            elif flush:
                adds = self._fresh_size(target, gpu, waiter.fresh)
            elif holding:
                adds = max(0, self.size(target, gpu, waiter.need) - self.size(target, gpu))
            else:
                adds = self.size(target, gpu, waiter.need)
            shortfall = self.used(gpu) - freed + adds - self._cap(gpu)
            if shortfall <= 0:
                continue
            candidates, young_until = self._candidates(gpu, [target, *victims], now)
            chosen = self.choose(shortfall, candidates, now)
            if chosen is None:
                until = young_until if protected_until is None else protected_until
                if until is not None:
                    self._wake_at = until  # room appears once residency is served
                holds[key] = hold
                return []  # wait: what would make room is pinned, busy in a plan, or young
            victims += chosen
        if victims and any(self.slots[v].busy for v in victims) and now < hold:
            holds[key] = hold  # the victims keep serving until the hold ends
            return []
        _, effects = self._start(target, victims, gpus, now)
        return effects

    def _start(
        self,
        target: str | None,
        victims: list[str],
        gpus: frozenset[str],
        now: float,
        *,
        force: bool = False,
        reason: str = "request",
    ) -> tuple[_Plan, list[Effect]]:
        for name in list(victims):  # a backend's own unit freed frees its models with it
            for child in self.children.get(name, ()):
                held = self.slots[child].state in HOLDS_VRAM and self.slots[child].plan is None
                if held and child not in victims:
                    victims.append(child)
        plan = _Plan(next(self._ids), target, victims, gpus, now, reason=reason, force=force)
        self.plans[plan.id] = plan
        effects: list[Effect] = [
            Note(
                "swap_started",
                target,
                detail={"victims": list(victims), "swap": plan.id, "reason": reason},
            )
        ]
        if target is not None:
            self.slots[target].plan = plan.id
        for name in victims:
            slot = self.slots[name]
            plan.prior[name] = slot.state
            slot.state = State.DRAINING
            slot.plan = plan.id
            effects.append(Note("draining", name, detail={"active": slot.busy, "swap": plan.id}))
        if victims:
            return plan, effects + self._drain_progress(plan, now)
        plan.drained_at = plan.unloaded_at = now
        if target is not None and self.slots[target].state is not State.RESIDENT:
            return plan, effects + self._load(plan)
        return plan, effects + self._finish(plan, now)

    def _drain_progress(self, plan: _Plan, now: float) -> list[Effect]:
        """Victims whose in-flight leases have all ended go on to the idle check, once each."""
        effects: list[Effect] = []
        for name in plan.victims:
            slot = self.slots[name]
            if slot.state is not State.DRAINING or name in plan.asked:
                continue
            if slot.active and not plan.force:  # its own jobs: the idle check (busy()) waits
                continue
            plan.asked.add(name)
            if plan.force:
                effects += self.idle(plan.id, name, now)
            else:
                effects.append(WaitIdle(plan.id, name))
        return effects

    def _finish(self, plan: _Plan, now: float) -> list[Effect]:
        del self.plans[plan.id]
        drained = plan.drained_at or now
        unloaded = plan.unloaded_at or now
        info = SwapInfo(
            target=plan.target,
            evicted=tuple(plan.victims),
            drain_s=drained - plan.started,
            unload_s=unloaded - drained,
            load_s=now - unloaded,
            failures=tuple(plan.failures),
            reason=plan.reason,
        )
        if plan.victims:
            self.swap_count += 1
            self.last_swap_at = now
        effects: list[Effect] = [SwapDone(plan.id, info)]
        if plan.target is None:
            return effects
        slot = self.slots[plan.target]
        if slot.state is not State.RESIDENT:
            slot.loaded_at = now
        slot.state = State.RESIDENT
        slot.plan = None
        slot.last_used = now
        for waiter in [w for w in self.queue if w.backend == plan.target]:
            if not self._has_room(slot) or not self._room_for(slot, waiter.need):
                break
            self.queue.remove(waiter)
            swap = info if plan.victims else None
            effects.append(self._admit(waiter.lease, slot, now, swap, need=waiter.need))
        return effects

    # --- reload (``gpubroker reload``): the config changed under a running broker ----------
    # Indexes kept beside ``slots`` (per backend, per GPU) must follow ``add_unit`` and
    # ``remove_backend`` here; ``respec`` never moves a unit to other GPUs.

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

    def retune(
        self, *, queue_timeout: float, hold_time: float, min_residency: float, aging: float
    ) -> None:
        """New timings, for every decision from now on (requests already queued included)."""
        self.queue_timeout = queue_timeout
        self.hold_time = hold_time
        self.min_residency = min_residency
        self.aging = aging
