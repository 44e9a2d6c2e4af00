"""bench/scheduler_cost.py on sizes CI affords: it still builds the world it claims to measure
and prints a figure for every event, so the before/after table can be reproduced."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("scheduler_cost")


@pytest.mark.parametrize("policy", ["exclusive", "budget"])
def test_the_world_is_one_busy_owner_and_everyone_else_waiting(
    bench: ModuleType, policy: str
) -> None:
    world = bench.build(policy, 8, 300)
    sched = world.sched
    assert sched.owner == "b0" and sched.in_flight("b0") == 2
    assert sched.queued() == 300 and sched.queued("b0") == 0
    assert not sched.plans  # the owner's hold runs: nothing is swapped yet


def test_every_event_gets_a_figure(bench: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--sizes", "10,100", "--backends", "2", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for policy in ("exclusive", "budget"):
        for event in bench.EVENTS:
            assert f"| {policy} | 2 | {event} |" in out
