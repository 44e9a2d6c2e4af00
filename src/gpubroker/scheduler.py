"""The VRAM scheduler (exclusive policy): it decides, it never does I/O.

Callers feed it events — a request arrived, a lease ended, a client left, an unload finished, the
clock moved — and it answers with *effects* to carry out: admit or refuse a lease, wait for a
backend to go idle, unload it, load the next one. Every method is synchronous and runs to the end
without awaiting, so on one event loop there is exactly one writer at a time and no lock; and
every decision can be replayed in a unit test with a fake clock.

A backend moves through these states (one owner at a time in the exclusive policy)::

    unknown ──► absent ──► loading ──► resident ──► draining ──► unloading ──► absent
                  ▲                                                               │
                  └───────────────────────────────────────────────────────────────┘

A swap makes ``target`` the owner: every other backend that may hold VRAM is drained (no new
leases, in-flight ones finish, then ``busy()`` must say idle), unloaded, and then the target is
loaded and all its queued requests are admitted together.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field


class State(enum.Enum):
    UNKNOWN = "unknown"  # may hold VRAM; we could not tell at start-up
    ABSENT = "absent"
    LOADING = "loading"
    RESIDENT = "resident"
    DRAINING = "draining"  # victim of a swap: no new leases, waiting for in-flight ones
    UNLOADING = "unloading"


# --- effects: what the driver must do --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwapInfo:
    """What a swap did, for the ``X-GPUBroker-Swap`` header and the history."""

    target: str | None
    evicted: tuple[str, ...]
    drain_s: float
    unload_s: float
    load_s: float
    failures: tuple[str, ...] = ()

    @property
    def total_s(self) -> float:
        return self.drain_s + self.unload_s + self.load_s

    def header(self) -> str:
        evicted = ",".join(self.evicted) or "-"
        return f"evicted={evicted}; to={self.target or '-'}; ms={round(self.total_s * 1000)}"


@dataclass(frozen=True, slots=True)
class Admit:
    lease: int
    backend: str
    swap: SwapInfo | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    lease: int
    backend: str
    status: int
    code: str
    message: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class WaitIdle:
    """Poll the backend's ``busy()`` until it is idle, then report ``idle(swap, backend)``."""

    swap: int
    backend: str


@dataclass(frozen=True, slots=True)
class Unload:
    """Run the backend's strategy ``unload()``; report ``unloaded(swap, backend, error)``."""

    swap: int
    backend: str


@dataclass(frozen=True, slots=True)
class Load:
    """Run the backend's strategy ``load()``; report ``loaded(swap, backend, error)``."""

    swap: int
    backend: str


@dataclass(frozen=True, slots=True)
class CancelSwap:
    """A swap was abandoned before anything was unloaded: stop its idle waits."""

    swap: int


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth recording (history, event stream, logs)."""

    kind: str
    backend: str | None = None
    lease: int | None = None
    detail: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SwapDone:
    """A swap finished (or an eviction without a target); ``info`` has its phase timings."""

    swap: int
    info: SwapInfo


Effect = Admit | Refuse | WaitIdle | Unload | Load | CancelSwap | Note | SwapDone


# --- state -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    name: str
    max_concurrency: int | None
    state: State = State.UNKNOWN
    active: set[int] = field(default_factory=set)
    last_used: float = 0.0

    @property
    def has_room(self) -> bool:
        return self.max_concurrency is None or len(self.active) < self.max_concurrency


@dataclass(slots=True)
class _Waiter:
    lease: int
    backend: str
    since: float


@dataclass(slots=True)
class _Swap:
    id: int
    target: str | None
    victims: list[str]
    started: float
    force: bool = False
    asked: set[str] = field(default_factory=set)  # victims sent to the idle check
    idle: set[str] = field(default_factory=set)  # victims whose busy() said idle
    gone: set[str] = field(default_factory=set)  # victims unloaded (or failed trying)
    failures: list[str] = field(default_factory=list)
    drained_at: float | None = None
    unloaded_at: float | None = None
    unload_started: bool = False


class Scheduler:
    """Exclusive-policy scheduler for one GPU domain. Times are seconds on any monotonic clock."""

    def __init__(
        self,
        backends: Iterable[tuple[str, int | None]],
        *,
        queue_timeout: float = 120.0,
        hold_time: float = 10.0,
    ) -> None:
        self.slots = {name: _Slot(name, limit) for name, limit in backends}
        self.queue_timeout = queue_timeout
        self.hold_time = hold_time
        self.owner: str | None = None
        self.queue: list[_Waiter] = []
        self.swap: _Swap | None = None
        self.hold_until: float | None = None
        self.swap_count = 0
        self.last_swap_at: float | None = None
        self._ids = itertools.count(1)

    # --- questions ------------------------------------------------------------------------

    def state(self, backend: str) -> State:
        return self.slots[backend].state

    def active(self, backend: str) -> int:
        return len(self.slots[backend].active)

    def queued(self, backend: str | None = None) -> int:
        return sum(1 for w in self.queue if backend is None or w.backend == backend)

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do (a queue timeout or the hold expiring)."""
        times = [w.since + self.queue_timeout for w in self.queue]
        if self.hold_until is not None:
            times.append(self.hold_until)
        return min(times) if times else None

    # --- events ---------------------------------------------------------------------------

    def reconciled(self, backend: str, resident: bool | None) -> list[Effect]:
        """Start-up: what the backend's strategy says it holds (None = cannot tell)."""
        slot = self.slots[backend]
        slot.state = {True: State.RESIDENT, False: State.ABSENT, None: State.UNKNOWN}[resident]
        holders = [s for s in self.slots.values() if s.state is not State.ABSENT]
        only = holders[0] if len(holders) == 1 else None
        self.owner = only.name if only is not None and only.state is State.RESIDENT else None
        return [Note("reconciled", backend, detail={"state": slot.state.value})]

    def request(self, lease: int, backend: str, now: float) -> list[Effect]:
        """A GPU request for ``backend`` wants a lease."""
        slot = self.slots[backend]
        if self._may_admit(slot, now) and not self.queued(backend):
            return [self._admit(lease, slot, now)]
        self.queue.append(_Waiter(lease, backend, now))
        effects: list[Effect] = [Note("queued", backend, lease, {"position": len(self.queue)})]
        if backend != self.owner and self.hold_until is None and self.owner is not None:
            self.hold_until = now + self.hold_time
        return effects + self._pump(now)

    def released(self, lease: int, now: float) -> list[Effect]:
        """A lease ended: its response was fully sent, or its client went away."""
        for slot in self.slots.values():
            if lease in slot.active:
                slot.active.discard(lease)
                slot.last_used = now
                return [Note("released", slot.name, lease), *self._pump(now)]
        return []

    def cancel(self, lease: int, now: float) -> list[Effect]:
        """The client of ``lease`` went away: leave the queue, or end the lease if admitted."""
        for i, waiter in enumerate(self.queue):
            if waiter.lease == lease:
                del self.queue[i]
                return [Note("left", waiter.backend, lease), *self._after_leave(now)]
        return self.released(lease, now)

    def tick(self, now: float) -> list[Effect]:
        """The clock moved: time out waiters past ``queue_timeout``, end an expired hold."""
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
        if self.swap is None or self.swap.id != swap or backend not in self.swap.victims:
            return []
        self.swap.idle.add(backend)
        self.slots[backend].state = State.UNLOADING
        self.swap.unload_started = True
        effects: list[Effect] = [Note("unloading", backend), Unload(swap, backend)]
        if self.swap.idle >= set(self.swap.victims):
            self.swap.drained_at = now
        return effects

    def unloaded(self, swap: int, backend: str, error: str | None, now: float) -> list[Effect]:
        """A victim's unload finished; with ``error`` it failed or timed out (the swap goes on)."""
        if self.swap is None or self.swap.id != swap:
            return []
        sw = self.swap
        sw.gone.add(backend)
        self.slots[backend].state = State.ABSENT
        effects: list[Effect] = [Note("unloaded", backend, detail={"error": error})]
        if error:
            sw.failures.append(f"{backend}: {error}")
        if sw.gone >= set(sw.victims):
            sw.unloaded_at = now
            if self.owner in sw.victims:
                self.owner = None
            if sw.target is None:
                return effects + self._finish_swap(now) + self._pump(now)
            target = self.slots[sw.target]
            if target.state is State.RESIDENT:
                return effects + self._finish_swap(now) + self._pump(now)
            target.state = State.LOADING
            effects += [Note("loading", sw.target), Load(sw.id, sw.target)]
        return effects

    def loaded(self, swap: int, backend: str, error: str | None, now: float) -> list[Effect]:
        """The target's ``load()`` finished; with ``error`` it could not be brought up."""
        if self.swap is None or self.swap.id != swap:
            return []
        slot = self.slots[backend]
        if error is None:
            return self._finish_swap(now) + self._pump(now)
        self.swap.failures.append(f"{backend}: {error}")
        slot.state = State.UNKNOWN
        self.swap = None
        effects: list[Effect] = [Note("load_failed", backend, detail={"error": error})]
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
        self, backend: str | None, force: bool, now: float
    ) -> tuple[int | None, list[Effect]]:
        """Admin: free ``backend`` (every backend when None) now; ``force`` skips the drain.

        Returns the swap id to wait for (None when there was nothing to do) and the effects.
        Raises ``SwapInProgress`` while another swap runs.
        """
        if self.swap is not None:
            raise SwapInProgress(self.swap.target)
        names = [backend] if backend else list(self.slots)
        victims = [n for n in names if self.slots[n].state is not State.ABSENT]
        if not victims:
            return None, []
        return self._start_swap(None, victims, now, force=force)

    # --- decisions ------------------------------------------------------------------------

    def _may_admit(self, slot: _Slot, now: float) -> bool:
        if self.swap is not None or self.owner != slot.name or slot.state is not State.RESIDENT:
            return False
        if not slot.has_room:
            return False
        return self.hold_until is None or now < self.hold_until

    def _admit(self, lease: int, slot: _Slot, now: float, swap: SwapInfo | None = None) -> Admit:
        slot.active.add(lease)
        slot.last_used = now
        return Admit(lease, slot.name, swap)

    def _foreign_waiters(self) -> list[_Waiter]:
        return [w for w in self.queue if w.backend != self.owner]

    def _after_leave(self, now: float) -> list[Effect]:
        """A waiter left. A swap still draining for nobody is abandoned: nothing was freed yet."""
        if not self._foreign_waiters():
            self.hold_until = None
        sw = self.swap
        if sw is None or sw.target is None or sw.unload_started or self.queued(sw.target):
            return []
        for name in sw.victims:
            self.slots[name].state = State.RESIDENT if name == self.owner else State.UNKNOWN
        self.swap = None
        return [CancelSwap(sw.id), Note("swap_abandoned", sw.target), *self._pump(now)]

    def _pump(self, now: float) -> list[Effect]:
        """Admit what may be admitted; start a swap when the owner should yield."""
        if self.swap is not None:
            return self._drain_progress(now)
        effects: list[Effect] = []
        if self.owner is not None:
            slot = self.slots[self.owner]
            for waiter in [w for w in self.queue if w.backend == self.owner]:
                if not self._may_admit(slot, now):
                    break
                self.queue.remove(waiter)
                effects.append(self._admit(waiter.lease, slot, now))
        foreign = self._foreign_waiters()
        if not foreign:
            self.hold_until = None
            return effects
        owner = self.slots[self.owner] if self.owner else None
        hold_over = self.hold_until is not None and now >= self.hold_until
        if owner is not None and owner.active and not hold_over:
            return effects  # the owner keeps the GPU until idle or its hold time is up
        target = foreign[0].backend
        victims = [
            s.name for s in self.slots.values() if s.name != target and s.state is not State.ABSENT
        ]
        _, started = self._start_swap(target, victims, now)
        return effects + started

    def _start_swap(
        self, target: str | None, victims: list[str], now: float, *, force: bool = False
    ) -> tuple[int, list[Effect]]:
        sw = _Swap(next(self._ids), target, victims, now, force=force)
        self.swap = sw
        self.hold_until = None
        effects: list[Effect] = [
            Note("swap_started", target, detail={"victims": list(victims), "swap": sw.id})
        ]
        for name in victims:
            self.slots[name].state = State.DRAINING
            effects.append(Note("draining", name, detail={"active": self.active(name)}))
        if not victims:
            sw.drained_at = sw.unloaded_at = now
            if target is not None and self.slots[target].state is not State.RESIDENT:
                self.slots[target].state = State.LOADING
                return sw.id, [*effects, Note("loading", target), Load(sw.id, target)]
            return sw.id, effects + self._finish_swap(now)
        return sw.id, effects + self._drain_progress(now)

    def _drain_progress(self, now: float) -> list[Effect]:
        """Victims whose in-flight leases have all ended go on to the idle check, once each."""
        sw = self.swap
        assert sw is not None
        effects: list[Effect] = []
        for name in sw.victims:
            slot = self.slots[name]
            if slot.state is not State.DRAINING or name in sw.asked:
                continue
            if slot.active and not sw.force:
                continue
            sw.asked.add(name)
            if sw.force:
                effects += self.idle(sw.id, name, now)
            else:
                effects.append(WaitIdle(sw.id, name))
        return effects

    def _finish_swap(self, now: float) -> list[Effect]:
        sw = self.swap
        assert sw is not None
        self.swap = None
        drained = sw.drained_at or now
        unloaded = sw.unloaded_at or now
        info = SwapInfo(
            target=sw.target,
            evicted=tuple(sw.victims),
            drain_s=drained - sw.started,
            unload_s=unloaded - drained,
            load_s=now - unloaded,
            failures=tuple(sw.failures),
        )
        if sw.victims:
            self.swap_count += 1
            self.last_swap_at = now
        effects: list[Effect] = [SwapDone(sw.id, info)]
        if sw.target is None:
            return effects
        self.owner = sw.target
        slot = self.slots[sw.target]
        slot.state = State.RESIDENT
        for waiter in [w for w in self.queue if w.backend == sw.target]:
            if not slot.has_room:
                break
            self.queue.remove(waiter)
            effects.append(self._admit(waiter.lease, slot, now, info if sw.victims else None))
        if self._foreign_waiters():
            self.hold_until = now + self.hold_time
        return effects


class SwapInProgress(Exception):
    """An admin eviction was asked for while a swap runs; try again when it is done."""

    def __init__(self, target: str | None) -> None:
        super().__init__(f"a swap to {target or 'nothing'} is in progress; try again shortly")
