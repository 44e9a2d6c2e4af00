"""How the scheduler makes room: who is admitted, which waiting unit is planned for, which
victims are drained, unloaded and replaced (the ``_pump`` every event ends with).

Part of :class:`~gpubroker.scheduling.scheduler.Scheduler`, which holds the state and feeds the
events; split out so no module is the whole scheduler. Every pass reads each unit's *first*
waiter (:class:`~gpubroker.scheduling.waitqueue.WaitQueue`) and the units of a GPU or a
conflict (:class:`~gpubroker.scheduling.unitindex.UnitIndex`), never the whole queue: its cost
grows with the units that have waiters, not with the number of waiters (issue 16).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable

from gpubroker.scheduling.effects import (
    Admit,
    CancelSwap,
    Effect,
    Load,
    Note,
    SwapDone,
    SwapInfo,
    WaitIdle,
)
from gpubroker.scheduling.sizing import Sizing
from gpubroker.scheduling.slots import HOLDS_VRAM, Chooser, Plan, Slot, State
from gpubroker.scheduling.victims import Candidate
from gpubroker.scheduling.waitqueue import WaitQueue


class Planning(Sizing):
    """The decisions; :class:`~gpubroker.scheduling.scheduler.Scheduler` owns the state."""

    children: dict[str, list[str]]  # backend -> its model units
    queue: WaitQueue
    plans: dict[int, Plan]
    hold_until: dict[str, float]  # GPU (the least a plan touches) -> when its hold ends
    hold_time: float
    min_residency: float
    aging: float
    choose: Chooser
    swap_count: int
    last_swap_at: float | None
    _wake_at: float | None  # minimum-residency or idle-timeout deadline
    _pumped_at: float  # when the queue was last pumped
    _ids: itertools.count[int]
    _holders: dict[int, Slot]  # lease admitted -> the unit it holds

    def idle(self, swap: int, backend: str, now: float) -> list[Effect]:
        """The event a forced plan's drain feeds itself (defined with the other events)."""
        raise NotImplementedError

    def _may_admit(self, slot: Slot) -> bool:
        return slot.state is State.RESIDENT and slot.plan is None and self._has_room(slot)

    def _has_room(self, slot: Slot) -> bool:
        """``maxConcurrency`` counts the backend's work over all its units."""
        limit = slot.spec.max_concurrency
        if limit is None:
            return True
        group = slot.spec.backend
        if group not in self.children:
            return slot.busy < limit
        return sum(self.slots[u].busy for u in (group, *self.children[group])) < limit

    def _admit(
        self,
        lease: int,
        slot: Slot,
        now: float,
        swap: SwapInfo | None = None,
        need: int | None = None,
    ) -> Admit:
        slot.active.add(lease)
        self._holders[lease] = slot
        slot.last_used = now
        if need is not None:
            slot.estimate = max(slot.estimate or 0, need)
        return Admit(lease, slot.name, swap)

    def _never_fits(self, backend: str, need: int | None = None) -> str | None:
        """Why ``backend`` asked for ``need`` can never be admitted, or None (pinned residents
        are immovable, and so is a pinned unit it may not be resident with)."""
        spec = self.slots[backend].spec
        for s in self.index.partners.get(backend, ()):
            if s.spec.pinned and s.state in HOLDS_VRAM:
                return (
                    f"{backend} may not be resident with {s.name} (exclusiveWith), which is "
                    "pinned: it can never be loaded"
                )
        for gpu in spec.gpus:
            cap = self._cap(gpu)
            pinned = sum(
                self.size(s.name, gpu)
                for s in self.index.gpu(gpu)
                if s.name != backend and s.spec.pinned and s.state in HOLDS_VRAM
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
            if plan.target is None or plan.unload_started or self.queue.count(plan.target):
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
        # 1. requests for resident backends, in arrival order: a unit's first waiter goes in
        # if it may, then its next one; the first that may not keeps the rest of its unit out.
        # (Admitting changes no unit's state or plan, so who is admitting is known up front.)
        heads = [
            (w.seq, w)
            for w in self.queue.firsts()
            if self.slots[w.backend].state is State.RESIDENT and self.slots[w.backend].plan is None
        ]
        while heads:
            _, waiter = heapq.heappop(heads)
            slot = self.slots[waiter.backend]
            if self._has_room(slot) and self._room_for(slot, waiter.need):
                self.queue.remove(waiter)
                effects.append(self._admit(waiter.lease, slot, now, need=waiter.need))
                after = self.queue.first(waiter.backend)
                if after is not None:
                    heapq.heappush(heads, (after.seq, after))
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
        for slot in self.index.idlers:
            timeout = slot.spec.idle_timeout
            gpus = frozenset(slot.spec.gpus)
            if (
                timeout is not None
                and slot.state is State.RESIDENT
                and slot.plan is None
                and not slot.busy
                and not self.queue.count(slot.name)
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
        gpus = set(self.slots[target].spec.gpus)
        for s in self.index.partners.get(target, ()):
            if s.state in HOLDS_VRAM:
                gpus |= set(s.spec.gpus)
        return frozenset(gpus)

    def _targets(self, now: float) -> list[str]:
        """Backends with waiters that need room, by aged priority then arrival."""
        oldest: dict[str, float] = {}
        for w in self.queue.firsts():  # each unit's first waiter, in arrival order
            slot = self.slots[w.backend]
            if slot.plan is not None:
                continue
            if slot.state is State.RESIDENT and self._room_for(slot, w.need):
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
        for s in self.index.gpu(gpu):
            if s.name in skip:
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
        waiter = self.queue.first(target)
        assert waiter is not None  # a target is a unit with waiters
        holding = slot.state in HOLDS_VRAM
        key = min(gpus)
        hold = self.hold_until.get(key, now + self.hold_time)  # runs from first blocked
        victims: list[str] = []
        protected_until: float | None = None
        for s in self.index.partners.get(target, ()):
            if s.state in HOLDS_VRAM:
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
    ) -> tuple[Plan, list[Effect]]:
        for name in list(victims):  # a backend's own unit freed frees its models with it
            for child in self.children.get(name, ()):
                held = self.slots[child].state in HOLDS_VRAM and self.slots[child].plan is None
                if held and child not in victims:
                    victims.append(child)
        plan = Plan(next(self._ids), target, victims, gpus, now, reason=reason, force=force)
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

    def _drain_progress(self, plan: Plan, now: float) -> list[Effect]:
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

    def _finish(self, plan: Plan, now: float) -> list[Effect]:
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
        while (waiter := self.queue.first(plan.target)) is not None:
            if not self._has_room(slot) or not self._room_for(slot, waiter.need):
                break
            self.queue.remove(waiter)
            swap = info if plan.victims else None
            effects.append(self._admit(waiter.lease, slot, now, swap, need=waiter.need))
        return effects

    def _want(self, unit: str) -> int | None:
        """What the first request queued for ``unit`` asks of it."""
        first = self.queue.first(unit)
        return first.need if first is not None else None

    def _load(self, plan: Plan) -> list[Effect]:
        """Bring the plan's target up; the note says whether it wakes from sleep."""
        assert plan.target is not None
        slot = self.slots[plan.target]
        wake = slot.state is State.ASLEEP
        slot.state = State.LOADING
        detail: dict[str, object] = {"wake": wake, "swap": plan.id}
        return [Note("loading", plan.target, detail=detail), Load(plan.id, plan.target)]
