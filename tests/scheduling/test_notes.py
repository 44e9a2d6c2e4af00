"""The scheduler's notes named as wire events: the renamings a watcher relies on."""

from __future__ import annotations

import pytest

from gpubroker import events as ev
from gpubroker.scheduling.effects import Note
from gpubroker.scheduling.notes import note_event
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler

G = 2**30
SCHED = Scheduler([BackendSpec("v", need=4 * G, sleeps=True), BackendSpec("o", need=2 * G)])


def test_unloading_a_service_that_sleeps_is_sleeping() -> None:
    assert note_event(Note("unloading", "v", detail={"swap": 3}), SCHED, None) == (
        ev.Sleeping,
        {"swap": 3},
    )
    assert note_event(Note("unloading", "o"), SCHED, None) == (ev.Unloading, {})


def test_unloaded_is_freed_with_what_it_held_measured_else_declared() -> None:
    note = Note("unloaded", "o", detail={"error": None, "holding": False, "swap": 1})
    measured = {"holding": False, "measured": True, "held": 3 * G, "swap": 1}
    assert note_event(note, SCHED, 3 * G) == (ev.Freed, measured)
    declared = {"holding": False, "measured": False, "held": 2 * G, "swap": 1}
    assert note_event(note, SCHED, None) == (ev.Freed, declared)
    failed = Note("unloaded", "o", detail={"error": "boom", "holding": True})
    assert note_event(failed, SCHED, None) == (
        ev.UnloadFailed,
        {"holding": True, "error": "boom"},
    )


def test_loading_from_sleep_is_waking() -> None:
    assert note_event(Note("loading", "v", detail={"wake": True}), SCHED, None)[0] is (ev.Waking)
    assert note_event(Note("loading", "o", detail={"wake": False}), SCHED, None)[0] is (ev.Loading)


def test_a_note_with_no_event_is_a_bug() -> None:
    with pytest.raises(ValueError, match="no event"):
        note_event(Note("mystery", "o"), SCHED, None)
