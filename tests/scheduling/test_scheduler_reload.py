"""The scheduler under a reload: a unit respecified for the next decisions, a backend removed
only once nothing of it is in flight."""

from __future__ import annotations

import pytest

from gpubroker.scheduling.effects import Admit, Load
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler, State

GiB = 2**30


def budget(*specs: BackendSpec) -> Scheduler:
    return Scheduler(specs, capacities={"0": 10 * GiB}, policy="budget", min_residency=0.0)


def test_a_respecified_size_decides_the_next_plan_not_what_is_resident() -> None:
    sched = budget(BackendSpec("a", need=4 * GiB), BackendSpec("b", need=4 * GiB))
    for name in ("a", "b"):
        sched.reconciled(name, False)
    effects = sched.request(1, "a", 0.0)
    assert any(isinstance(e, Load) for e in effects)
    plan = next(e for e in effects if isinstance(e, Load)).swap
    sched.loaded(plan, "a", None, 0.1)
    sched.released(1, 0.2)
    sched.respec(BackendSpec("b", need=7 * GiB), 0.3)
    assert sched.state("a") is State.RESIDENT  # nothing moves until someone asks
    effects = sched.request(2, "b", 0.4)
    assert sched.state("a") is State.DRAINING  # 4 + 7 > 10: a makes room now


def test_a_learned_footprint_survives_a_respec_that_declares_none() -> None:
    sched = budget(BackendSpec("a", need=None, source="unknown"))
    sched.learned("a", 3 * GiB)
    sched.respec(BackendSpec("a", need=None, source="unknown", priority=2), 0.0)
    assert sched.slots["a"].spec.need == 3 * GiB and sched.slots["a"].spec.priority == 2
    sched.respec(BackendSpec("a", need=5 * GiB), 0.0)  # declared now: that wins
    assert sched.slots["a"].spec.need == 5 * GiB


def test_a_respec_cannot_move_a_unit_to_other_gpus() -> None:
    sched = budget(BackendSpec("a"))
    with pytest.raises(ValueError, match="GPUs cannot change"):
        sched.respec(BackendSpec("a", gpus=("1",)), 0.0)


def test_a_backend_is_removed_only_when_nothing_of_it_is_in_flight() -> None:
    sched = budget(
        BackendSpec("a", need=2 * GiB),
        BackendSpec("a/m", need=1 * GiB, group="a", model="m"),
        BackendSpec("b", need=2 * GiB),
    )
    sched.reconciled("a", True)
    sched.reconciled("a/m", True)
    sched.reconciled("b", True)
    assert any(isinstance(e, Admit) for e in sched.request(1, "a/m", 0.0))
    with pytest.raises(RuntimeError, match="still in use"):
        sched.remove_backend("a")
    sched.released(1, 0.1)
    sched.remove_backend("a")
    assert set(sched.slots) == {"b"} and "a" not in sched.children


def test_retune_changes_the_timings_of_the_next_decisions() -> None:
    sched = budget(BackendSpec("a"))
    sched.retune(queue_timeout=5.0, hold_time=1.0, min_residency=2.0, aging=9.0)
    assert (sched.queue_timeout, sched.hold_time, sched.min_residency, sched.aging) == (
        5.0,
        1.0,
        2.0,
        9.0,
    )
