"""A service's own jobs (ComfyUI's queue) in the pure scheduler: busy like a lease."""

from __future__ import annotations

from gpubroker.scheduling.effects import Admit, WaitIdle
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler
from scheduler_harness import Harness


def make(**kw: float) -> Harness:
    specs = [
        BackendSpec("comfy", max_concurrency=1, idle_timeout=60.0),
        BackendSpec("chat"),
    ]
    sched = Scheduler(specs, **kw)
    for name in ("comfy", "chat"):
        sched.reconciled(name, False)
    h = Harness(sched)
    h.request(1, "comfy")
    h.run_io()
    return h


def test_a_queued_job_takes_the_only_concurrency_slot_until_it_ends() -> None:
    h = make()
    h.feed(h.sched.jobs("comfy", 1, h.now))
    h.release(1)  # /prompt answered; its job is still in ComfyUI's queue
    assert h.sched.in_flight("comfy") == 1
    effects = h.request(2, "comfy")
    assert not [e for e in effects if isinstance(e, Admit)]  # waits: the job holds the slot
    admitted = h.feed(h.sched.jobs("comfy", 0, h.now))
    assert [e.lease for e in admitted if isinstance(e, Admit)] == [2]


def test_jobs_keep_the_owner_busy_through_the_hold_and_the_drain_waits_for_idle() -> None:
    h = make(hold_time=10.0)
    h.feed(h.sched.jobs("comfy", 1, h.now))
    h.release(1)
    h.now = 1.0
    h.request(3, "chat")
    assert h.unloads() == [] and not h.pending(WaitIdle)  # the owner is rendering: held
    h.now = 11.0
    h.feed(h.sched.tick(h.now))  # hold over: the drain starts; its idle check asks busy()
    assert [e.backend for e in h.pending(WaitIdle)] == ["comfy"]


def test_a_long_job_ending_starts_the_idle_timeout_afresh() -> None:
    h = make()
    h.feed(h.sched.jobs("comfy", 1, h.now))
    h.release(1)
    h.now = 600.0  # a ten-minute render ends
    started = h.feed(h.sched.jobs("comfy", 0, h.now))
    assert started == [] and h.pending(WaitIdle) == []  # not unloaded the moment it ended
    assert h.sched.next_deadline() == 660.0
    h.now = 660.0
    h.feed(h.sched.tick(h.now))
    assert [e.backend for e in h.pending(WaitIdle)] == ["comfy"]
    h.run_io()
    assert h.unloads() == ["comfy"]
