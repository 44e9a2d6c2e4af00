"""Budget policy, multi-GPU and the victim choice; then properties over random traces."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpubroker.scheduling.effects import Admit, Effect, Load, Refuse, SwapDone, Unload, WaitIdle
from gpubroker.scheduling.scheduler import HOLDS_VRAM, BackendSpec, Scheduler, State
from gpubroker.scheduling.victims import Candidate, choose_victims
from scheduler_harness import Harness

G = 2**30


# --- choose_victims ---------------------------------------------------------------------------


def test_victims_lower_priority_first() -> None:
    cands = [Candidate("hi", 8 * G, priority=5), Candidate("lo", 8 * G, priority=1)]
    assert choose_victims(4 * G, cands) == ["lo"]


def test_victims_sleep_before_unload_before_stop() -> None:
    cands = [Candidate("proc", 8 * G, cost=3), Candidate("ollama", 8 * G, cost=2),
             Candidate("vllm", 8 * G, cost=1)]  # fmt: skip
    assert choose_victims(4 * G, cands) == ["vllm"]


def test_victims_least_recently_used_first() -> None:
    cands = [Candidate("new", 8 * G, last_used=50), Candidate("old", 8 * G, last_used=10)]
    assert choose_victims(4 * G, cands) == ["old"]


def test_victims_never_pinned_or_protected() -> None:
    cands = [Candidate("pin", 8 * G, pinned=True), Candidate("young", 8 * G, protected=True)]
    assert choose_victims(4 * G, cands) is None


def test_victims_spare_what_is_not_needed() -> None:
    # priority order takes the small one first, but the big one alone covers the shortfall
    cands = [Candidate("small", 1 * G, priority=0), Candidate("big", 8 * G, priority=1)]
    assert choose_victims(6 * G, cands) == ["big"]


def test_no_victims_needed_for_no_shortfall() -> None:
    assert choose_victims(0, [Candidate("a", G)]) == []


# --- the budget scheduler ---------------------------------------------------------------------


def budget(*specs: BackendSpec, cap: dict[str, int | None] | None = None, **kw: float) -> Harness:
    sched = Scheduler(specs, capacities=cap or {"0": 24 * G}, policy="budget", **kw)
    for s in specs:
        sched.reconciled(s.name, False)
    return Harness(sched)


def test_backends_that_fit_together_co_reside() -> None:
    h = budget(BackendSpec("chat", need=9 * G), BackendSpec("embed", need=1 * G),
               BackendSpec("image", need=7 * G))  # fmt: skip
    for i, name in enumerate(["chat", "embed", "image"]):
        h.request(i, name)
        h.run_io()
    assert h.admitted() == [0, 1, 2]
    assert h.unloads() == []
    assert h.sched.residents() and set(h.sched.residents()) == {"chat", "embed", "image"}


def test_when_it_does_not_fit_only_enough_is_evicted() -> None:
    h = budget(BackendSpec("a", need=10 * G, priority=2), BackendSpec("b", need=10 * G),
               BackendSpec("c", need=10 * G, priority=1))  # fmt: skip
    h.request(1, "a")
    h.run_io()
    h.request(2, "b")
    h.run_io()
    h.feed(h.sched.released(1, h.now))
    h.feed(h.sched.released(2, h.now))
    h.request(3, "c")
    h.run_io()
    assert h.unloads() == ["b"]  # lowest priority, and one victim is enough
    assert 3 in h.admitted()


def test_pinned_is_never_evicted_and_what_cannot_fit_is_507_at_once() -> None:
    h = budget(BackendSpec("pin", need=16 * G, pinned=True), BackendSpec("big", need=12 * G),
               BackendSpec("small", need=6 * G))  # fmt: skip
    h.request(1, "pin")
    h.run_io()
    refused = [e for e in h.request(2, "big") if isinstance(e, Refuse)]
    assert [(r.status, r.code) for r in refused] == [(507, "never_fits")]
    assert "12.0 GiB" in refused[0].message and "16.0 GiB pinned" in refused[0].message
    h.request(3, "small")
    h.run_io()
    assert 3 in h.admitted() and "pin" not in h.unloads()


def test_minimum_residency_protects_a_fresh_load() -> None:
    h = budget(BackendSpec("a", need=20 * G), BackendSpec("b", need=20 * G), min_residency=5.0)
    h.request(1, "a")
    h.run_io()
    h.feed(h.sched.released(1, h.now))
    h.now = 1.0
    h.request(2, "b")
    assert h.unloads() == [] and h.sched.next_deadline() == 5.0
    h.now = 5.0
    h.feed(h.sched.tick(h.now))
    h.run_io()
    assert h.unloads() == ["a"] and 2 in h.admitted()


def test_idle_timeout_unloads_an_unused_backend() -> None:
    h = budget(BackendSpec("a", need=4 * G, idle_timeout=60.0))
    h.request(1, "a")
    h.run_io()
    h.now = 10.0
    h.feed(h.sched.released(1, h.now))
    assert h.sched.next_deadline() == 70.0
    h.now = 70.0
    h.feed(h.sched.tick(h.now))
    h.run_io()
    assert h.unloads() == ["a"] and h.sched.state("a") is State.ABSENT
    done = [e.info for e in h.effects if isinstance(e, SwapDone)]
    assert done[-1].reason == "idle"


@pytest.mark.parametrize(("cost", "sleeps"), [(1, True), (2, True)])
def test_sleeping_backend_is_asleep_not_absent_and_is_woken_by_load(
    cost: int, sleeps: bool
) -> None:
    h = budget(
        BackendSpec("vllm", need=20 * G, cost=cost, sleeps=sleeps), BackendSpec("o", need=20 * G)
    )
    h.request(1, "vllm")
    h.run_io()
    h.feed(h.sched.released(1, h.now))
    h.request(2, "o")
    h.run_io()
    assert h.sched.state("vllm") is State.ASLEEP
    h.feed(h.sched.released(2, h.now))
    h.request(3, "vllm")
    h.run_io()
    assert [e.backend for e in h.effects if isinstance(e, Load)] == ["vllm", "o", "vllm"]


def test_a_cheap_backend_that_unloads_is_absent_not_asleep() -> None:
    # the rank says "evict me first"; only frees_by == "sleep" makes a backend asleep
    h = budget(BackendSpec("cheap", need=20 * G, cost=1), BackendSpec("o", need=20 * G))
    h.request(1, "cheap")
    h.run_io()
    h.feed(h.sched.released(1, h.now))
    h.request(2, "o")
    h.run_io()
    assert h.sched.state("cheap") is State.ABSENT


def test_backends_on_different_gpus_never_wait_for_each_other() -> None:
    h = budget(BackendSpec("a0", gpus=("0",), need=20 * G), BackendSpec("b0", gpus=("0",),
               need=20 * G), BackendSpec("c1", gpus=("1",), need=20 * G),
               cap={"0": 24 * G, "1": 24 * G})  # fmt: skip
    h.request(1, "a0")
    h.run_io()
    h.request(2, "b0")  # needs a0 out; a0 has lease 1 in flight and a long hold
    effects = h.request(3, "c1")
    loads = [e.backend for e in effects if isinstance(e, Load)]
    assert loads == ["c1"]  # GPU 1 proceeds while GPU 0 is busy


def test_a_backend_spanning_two_gpus_needs_room_on_both() -> None:
    h = budget(BackendSpec("wide", gpus=("0", "1"), need=16 * G),
               BackendSpec("g1", gpus=("1",), need=16 * G),
               cap={"0": 24 * G, "1": 24 * G})  # fmt: skip
    h.request(1, "g1")
    h.run_io()
    h.feed(h.sched.released(1, h.now))
    h.request(2, "wide")
    h.run_io()
    assert h.unloads() == ["g1"] and 2 in h.admitted()


def test_budget_without_a_capacity_behaves_as_exclusive() -> None:
    h = budget(BackendSpec("a", need=1 * G), BackendSpec("b", need=1 * G), cap={"0": None})
    h.request(1, "a")
    h.run_io()
    h.feed(h.sched.released(1, h.now))
    h.request(2, "b")
    h.run_io()
    assert h.unloads() == ["a"]


def test_priority_with_aging_orders_waiting_backends() -> None:
    h = budget(BackendSpec("cur", need=20 * G), BackendSpec("low", need=20 * G),
               BackendSpec("high", need=20 * G, priority=1), aging=10.0)  # fmt: skip
    h.request(1, "cur")
    h.run_io()
    h.request(2, "low")  # arrives first
    h.now = 1.0
    h.request(3, "high")  # higher priority, arrives later: goes first
    h.feed(h.sched.released(1, h.now))
    h.run_io()
    assert h.admitted().index(3) < h.admitted().index(2) if 2 in h.admitted() else 3 in h.admitted()


# --- properties over random traces ------------------------------------------------------------

SPECS_ONE = [
    BackendSpec("a", need=10 * G, priority=1, max_concurrency=2),
    BackendSpec("b", need=8 * G, cost=1, sleeps=True),
    BackendSpec("c", need=6 * G, pinned=True),
    BackendSpec("d", need=14 * G),
]
SPECS_TWO = [
    BackendSpec("a", gpus=("0",), need=10 * G),
    BackendSpec("b", gpus=("1",), need=16 * G, cost=1, sleeps=True),
    BackendSpec("w", gpus=("0", "1"), need=12 * G, priority=1),
    BackendSpec("p", gpus=("1",), need=4 * G, pinned=True),
]

op = st.one_of(
    st.tuples(st.just("arrive"), st.integers(0, 3)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("io"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("time"), st.floats(0.0, 40.0)),
)


def check_invariants(s: Scheduler, now: float, pinned_loaded: set[str]) -> None:
    for gpu, cap in s.capacity.items():
        assert cap is not None
        held = sum(
            s.size(n, gpu)
            for n, slot in s.slots.items()
            if gpu in slot.spec.gpus and slot.state in HOLDS_VRAM
        )
        assert held <= cap, f"GPU {gpu} over-committed: {held} > {cap}"
    for name, slot in s.slots.items():
        if slot.state is State.UNLOADING:
            assert not slot.active, f"{name} unloading with requests in flight"
        if name in pinned_loaded:
            assert slot.state is State.RESIDENT, f"pinned {name} was evicted"
    for w in s.queue:
        assert now - w.since < s.queue_timeout, "a waiter outlived queueTimeout"


@pytest.mark.parametrize("specs,caps", [
    (SPECS_ONE, {"0": 24 * G}),
    (SPECS_TWO, {"0": 24 * G, "1": 24 * G}),
])  # fmt: skip
@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, max_size=80))
def test_random_traces_keep_every_promise(
    specs: list[BackendSpec], caps: dict[str, int], ops: list[tuple]
) -> None:
    s = Scheduler(specs, capacities=caps, policy="budget", queue_timeout=30.0, hold_time=5.0,
                  min_residency=2.0, aging=10.0)  # fmt: skip
    for spec in specs:
        s.reconciled(spec.name, False)
    now = 0.0
    next_lease = 0
    pending_io: list[Effect] = []
    outcome: dict[int, str] = {}  # lease -> "admitted" | "refused" | "waiting" | "gone"
    admitted_live: set[int] = set()
    pinned_loaded: set[str] = set()

    def apply(effects: list[Effect]) -> None:
        for e in effects:
            if isinstance(e, Admit):
                assert outcome.get(e.lease) in (None, "waiting"), "admitted twice"
                outcome[e.lease] = "admitted"
                admitted_live.add(e.lease)
                if s.slots[e.backend].spec.pinned:
                    pinned_loaded.add(e.backend)
            elif isinstance(e, Refuse):
                assert outcome.get(e.lease) in (None, "waiting")
                outcome[e.lease] = "refused"
            elif isinstance(e, WaitIdle | Unload | Load):
                pending_io.append(e)

    def complete(e: Effect, ok: bool) -> list[Effect]:
        if isinstance(e, WaitIdle):
            return s.idle(e.swap, e.backend, now)
        if isinstance(e, Unload):
            return s.unloaded(e.swap, e.backend, None if ok else "boom", now)
        assert isinstance(e, Load)
        return s.loaded(e.swap, e.backend, None if ok else "boom", now)

    for step in ops:
        kind = step[0]
        if kind == "arrive":
            lease, next_lease = next_lease, next_lease + 1
            outcome[lease] = "waiting"
            apply(s.request(lease, specs[step[1]].name, now))
        elif kind == "release" and admitted_live:
            lease = sorted(admitted_live)[step[1] % len(admitted_live)]
            admitted_live.discard(lease)
            apply(s.released(lease, now))
        elif kind == "cancel":
            waiting = [k for k, v in outcome.items() if v == "waiting"]
            if waiting:
                lease = waiting[step[1] % len(waiting)]
                outcome[lease] = "gone"
                apply(s.cancel(lease, now))
        elif kind == "io" and pending_io:
            e = pending_io.pop(step[1] % len(pending_io))
            apply(complete(e, step[2]))
        elif kind == "time":
            now += step[1]
            apply(s.tick(now))
        check_invariants(s, now, pinned_loaded)

    # Drain: finish every lease and every I/O; nothing may be left hanging.
    for _ in range(200):
        if admitted_live:
            apply(s.released(admitted_live.pop(), now))
        elif pending_io:
            apply(complete(pending_io.pop(0), True))
        elif s.queue:
            now += 5.0
            apply(s.tick(now))
        else:
            break
        check_invariants(s, now, pinned_loaded)
    assert not s.queue, "requests left waiting forever (deadlock)"
    assert not pending_io and not s.plans, "a plan never finished"
    assert all(not slot.active for slot in s.slots.values()), "a lease was never released"
    assert all(v != "waiting" for v in outcome.values()), "a request got no answer"


def test_a_victim_still_holding_its_memory_stops_the_load() -> None:
    h = budget(BackendSpec("a", need=20 * G), BackendSpec("b", need=20 * G))
    h.request(1, "a")
    h.run_io()
    h.feed(h.sched.released(1, h.now))
    h.request(2, "b")
    (wait,) = [e for e in h.effects if isinstance(e, WaitIdle)]
    h.feed(h.sched.idle(wait.swap, "a", h.now))
    effects = h.feed(h.sched.unloaded(wait.swap, "a", "memory not freed", h.now, holding=True))
    assert not [e for e in effects if isinstance(e, Load) and e.backend == "b"]
    # a counts as resident again, so b's waiter plans afresh: a is drained and unloaded again
    assert h.sched.state("a") is State.DRAINING
    assert any(isinstance(e, WaitIdle) and e.swap != wait.swap for e in effects)
