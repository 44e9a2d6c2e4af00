"""``wait_note``: what a queued lease is told it waits for, read from the scheduler's state."""

from __future__ import annotations

from gpubroker.scheduling.effects import Unload, WaitIdle
from gpubroker.scheduling.scheduler import Scheduler
from gpubroker.scheduling.waiting import ordinal, wait_note
from scheduler_harness import Harness


def make() -> Harness:
    sched = Scheduler([("a", None), ("b", None), ("c", 1)], hold_time=5.0)
    for name in "abc":
        sched.reconciled(name, False)
    return Harness(sched)


def test_ordinals() -> None:
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th",
    ]  # fmt: skip


def test_a_first_load_says_loading() -> None:
    h = make()
    h.request(1, "a")
    h.now = 0.4
    assert wait_note(h.sched, 1, h.now) == "loading a, 0.4 s"
    h.run_io()
    assert wait_note(h.sched, 1, h.now) is None  # admitted: it waits no more


def test_a_held_owner_puts_the_request_in_line_then_a_swap_names_each_phase() -> None:
    h = make()
    h.request(1, "a")
    h.run_io()  # a resident, lease 1 in flight
    h.request(2, "b")
    h.request(3, "b")
    h.now = 1.0
    assert wait_note(h.sched, 2, h.now) == "queued 1st behind a, 1.0 s"
    assert wait_note(h.sched, 3, h.now) == "queued 2nd behind a, 1.0 s"
    h.release(1)  # the swap starts: a drains
    h.now = 1.5
    assert wait_note(h.sched, 3, h.now) == "swapping a→b (draining a), 0.5 s"
    wait = h.pending(WaitIdle)[0]
    h.feed(h.sched.idle(wait.swap, "a", h.now))
    assert wait_note(h.sched, 2, h.now) == "swapping a→b (unloading a), 0.5 s"
    unload = h.pending(Unload)[0]
    h.now = 2.0
    h.feed(h.sched.unloaded(unload.swap, "a", None, h.now))
    assert wait_note(h.sched, 2, h.now) == "swapping a→b (loading b), 1.0 s"
    h.run_io()
    assert wait_note(h.sched, 2, h.now) is None and wait_note(h.sched, 3, h.now) is None


def test_a_full_backend_says_what_it_waits_behind() -> None:
    h = make()
    h.request(1, "c")
    h.run_io()
    h.request(2, "c")  # maxConcurrency 1: waits for its own backend
    assert wait_note(h.sched, 2, h.now) == "queued 1st behind 1 in flight on c, 0.0 s"
    assert wait_note(h.sched, 99, h.now) is None  # a lease the queue does not hold
