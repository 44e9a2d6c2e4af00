"""Measured VRAM refines the scheduler's sizes: the larger of declared and measured counts."""

from __future__ import annotations

from gpubroker.scheduling.effects import Admit, Note, Unload, WaitIdle
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler, State

G = 2**30


def budget() -> Scheduler:
    return Scheduler(
        [BackendSpec("a", need=2 * G), BackendSpec("b", need=2 * G)],
        capacities={"0": 8 * G},
        policy="budget",
    )


def admitted(effects: list) -> list[int]:  # type: ignore[type-arg]
    return [e.lease for e in effects if isinstance(e, Admit)]


def test_size_is_the_larger_of_declared_and_measured() -> None:
    s = budget()
    assert s.size("a", "0") == 2 * G
    assert s.measured("a", "0", 5 * G, now=0.0) == []  # nothing waits: nothing to do
    assert s.size("a", "0") == 5 * G
    s.measured("a", "0", 1 * G, now=0.0)
    assert s.size("a", "0") == 2 * G  # smaller than declared: the declaration stands
    s.measured("a", "0", 5 * G, now=0.0)
    s.measured("a", "0", None, now=0.0)  # cannot tell any more: back to declared
    assert s.size("a", "0") == 2 * G
    assert s.measured("a", "7", 5 * G, now=0.0) == [] and s.size("a", "0") == 2 * G  # not its GPU


def test_a_backend_bigger_than_declared_makes_the_next_one_wait_for_room() -> None:
    s = budget()
    s.reconciled("a", True)
    s.reconciled("b", False)
    s.measured("a", "0", 7 * G, now=0.0)  # declared 2 GiB, really holds 7
    effects = s.request(1, "b", now=10.0)
    assert not admitted(effects)
    assert s.state("a") is State.DRAINING  # 7 + 2 > 8: a must go first
    assert any(isinstance(e, WaitIdle) and e.backend == "a" for e in effects)


def test_declared_sizes_alone_would_have_let_both_in() -> None:
    s = budget()
    s.reconciled("a", True)
    s.reconciled("b", False)
    effects = s.request(1, "b", now=10.0)
    assert s.state("a") is State.RESIDENT  # 2 + 2 <= 8: co-resident
    assert any(isinstance(e, Note) and e.kind == "loading" for e in effects)


def test_a_measurement_that_shrinks_lets_a_waiter_in_at_once() -> None:
    s = Scheduler(
        [BackendSpec("a", need=2 * G), BackendSpec("b", need=2 * G)],
        capacities={"0": 8 * G},
        policy="budget",
        min_residency=100.0,
    )
    s.reconciled("a", True, now=0.0)
    s.reconciled("b", False)
    s.measured("a", "0", 7 * G, now=0.0)
    assert not admitted(s.request(1, "b", now=1.0))  # a is too young to evict: b waits
    assert s.state("a") is State.RESIDENT
    effects = s.measured("a", "0", 3 * G, now=2.0)  # a gave memory back
    assert any(isinstance(e, Note) and e.kind == "loading" and e.backend == "b" for e in effects)
    assert not any(isinstance(e, Unload) for e in effects)
