"""The exclusive scheduler, driven with a fake clock and no sockets: every decision replayed."""

from __future__ import annotations

import pytest

from gpubroker.errors import SwapInProgress
from gpubroker.scheduling.effects import Admit, CancelSwap, Load, Refuse, SwapDone, Unload, WaitIdle
from gpubroker.scheduling.scheduler import Scheduler, State
from scheduler_harness import Harness


def make(**kw: float) -> Harness:
    sched = Scheduler([("a", None), ("b", None), ("c", 1)], **kw)
    for name in "abc":
        sched.reconciled(name, False)
    return Harness(sched)


def test_first_request_loads_its_backend_and_is_admitted_after_load() -> None:
    h = make()
    assert not [e for e in h.request(1, "a") if isinstance(e, Admit)]
    assert [e.backend for e in h.pending(Load)] == ["a"]
    assert h.pending(Unload) == []  # nothing else held VRAM
    h.run_io()
    assert h.admitted() == [1]
    assert h.sched.owner == "a"


def test_owner_requests_are_admitted_at_once() -> None:
    h = make()
    h.request(1, "a")
    h.run_io()
    effects = h.request(2, "a")
    assert [type(e) for e in effects] == [Admit]


def test_two_simultaneous_first_requests_do_not_unload_their_own_backend() -> None:
    h = make()
    h.request(1, "a")
    h.request(2, "a")
    h.run_io()
    assert sorted(h.admitted()) == [1, 2]
    assert [e.backend for e in h.pending(Unload)] == []
    assert len(h.pending(Load)) == 1


def test_swap_waits_for_in_flight_then_unloads_then_loads_and_batches() -> None:
    h = make()
    h.request(1, "a")
    h.run_io()
    h.request(2, "b")
    h.request(3, "b")
    assert h.pending(WaitIdle) == []  # a still has lease 1 in flight
    h.now = 1.0
    h.release(1)
    assert [e.backend for e in h.pending(WaitIdle)] == ["a"]
    h.run_io()
    assert [e.backend for e in h.pending(Unload)] == ["a"]
    assert sorted(h.admitted()) == [1, 2, 3]
    assert h.sched.owner == "b" and h.sched.state("a") is State.ABSENT
    assert h.sched.swap_count == 1
    swap = h.pending(SwapDone)[-1].info
    assert swap.evicted == ("a",) and swap.target == "b"
    admits = [e for e in h.effects if isinstance(e, Admit) and e.lease in (2, 3)]
    assert all(e.swap is swap for e in admits)


def test_draining_owner_admits_nothing_new() -> None:
    h = make()
    h.request(1, "a")
    h.run_io()
    h.request(2, "b")
    h.now = 20.0  # hold time over
    h.feed(h.sched.tick(h.now))
    assert h.sched.state("a") is State.DRAINING
    assert not [e for e in h.request(3, "a") if isinstance(e, Admit)]


def test_owner_keeps_admitting_only_for_the_hold_time() -> None:
    h = make(hold_time=5.0)
    h.request(1, "a")
    h.run_io()
    h.request(2, "b")
    h.now = 4.0
    assert [type(e) for e in h.request(3, "a")] == [Admit]
    h.now = 5.0
    assert not [e for e in h.request(4, "a") if isinstance(e, Admit)]
    h.feed(h.sched.tick(h.now))
    h.release(1)
    h.release(3)
    h.run_io()
    assert 2 in h.admitted() and 4 not in h.admitted()
    assert h.sched.owner == "b"


def test_queue_timeout_refuses_with_503_and_retry_after() -> None:
    h = make(queue_timeout=10.0)
    h.request(1, "a")
    h.run_io()
    h.request(2, "b")
    h.now = 10.0
    refused = [e for e in h.feed(h.sched.tick(h.now)) if isinstance(e, Refuse)]
    assert [(r.lease, r.status) for r in refused] == [(2, 503)]
    assert refused[0].retry_after and refused[0].retry_after >= 1


def test_waiter_timing_out_mid_swap_does_not_wedge_ownership() -> None:
    h = make(queue_timeout=10.0)
    h.request(1, "a")
    h.run_io()
    h.request(2, "b")
    h.release(1)
    (wait,) = h.pending(WaitIdle)
    h.feed(h.sched.idle(wait.swap, "a", h.now))  # unload of a has started
    h.now = 11.0
    h.feed(h.sched.tick(h.now))  # lease 2 times out while a is unloading
    (unload,) = h.pending(Unload)
    h.feed(h.sched.unloaded(unload.swap, "a", None, h.now))
    h.run_io()
    assert h.sched.owner == "b" and not h.sched.swapping
    h.request(3, "a")  # the GPU is still usable afterwards
    h.run_io()
    assert 3 in h.admitted() and h.sched.owner == "a"


def test_swap_abandoned_when_its_only_waiter_leaves_before_unload() -> None:
    h = make()
    h.request(1, "a")
    h.run_io()
    h.request(2, "b")
    h.release(1)
    assert h.pending(WaitIdle)
    effects = h.feed(h.sched.cancel(2, h.now))
    assert any(isinstance(e, CancelSwap) for e in effects)
    assert h.sched.owner == "a" and h.sched.state("a") is State.RESIDENT
    assert [type(e) for e in h.request(3, "a")] == [Admit]


def test_client_leaving_queue_never_becomes_a_lease() -> None:
    h = make()
    h.request(1, "a")
    h.request(2, "a")
    h.feed(h.sched.cancel(2, h.now))
    h.run_io()
    assert h.admitted() == [1]
    assert h.sched.active("a") == 1


def test_unload_failure_is_recorded_and_the_swap_goes_on() -> None:
    h = make()
    h.request(1, "a")
    h.run_io()
    h.release(1)
    h.request(2, "b")
    (wait,) = h.pending(WaitIdle)
    h.feed(h.sched.idle(wait.swap, "a", h.now))
    h.feed(h.sched.unloaded(wait.swap, "a", "timed out after 10s", h.now))
    h.run_io()
    assert 2 in h.admitted()
    assert h.pending(SwapDone)[-1].info.failures == ("a: timed out after 10s",)


def test_load_failure_refuses_its_waiters_with_502() -> None:
    h = make()
    h.request(1, "a")
    (load,) = h.pending(Load)
    refused = [
        e for e in h.feed(h.sched.loaded(load.swap, "a", "boom", 0)) if isinstance(e, Refuse)
    ]
    assert [(r.lease, r.status) for r in refused] == [(1, 502)]
    assert not h.sched.swapping


def test_max_concurrency_queues_beyond_the_limit() -> None:
    h = make()
    h.request(1, "c")
    h.run_io()
    assert h.admitted() == [1]
    h.request(2, "c")
    assert h.admitted() == [1]
    h.release(1)
    assert h.admitted() == [1, 2]


def test_unknown_backends_are_freed_before_the_first_request() -> None:
    sched = Scheduler([("a", None), ("b", None)])
    sched.reconciled("a", None)
    sched.reconciled("b", True)
    h = Harness(sched)
    h.request(1, "a")
    h.run_io()
    assert [e.backend for e in h.pending(Unload)] == ["b"]
    assert h.admitted() == [1]


def test_reconciled_resident_owner_needs_no_swap() -> None:
    sched = Scheduler([("a", None), ("b", None)])
    sched.reconciled("a", True)
    sched.reconciled("b", False)
    assert [type(e) for e in sched.request(1, "a", 0.0)] == [Admit]


def test_admin_evict_and_evict_during_swap() -> None:
    h = make()
    h.request(1, "a")
    h.run_io()
    swap_id, effects = h.sched.evict("a", False, h.now)
    h.feed(effects)
    assert swap_id is not None and h.pending(WaitIdle) == []  # lease 1 in flight
    with pytest.raises(SwapInProgress):
        h.sched.evict(None, False, h.now)
    h.release(1)
    h.run_io()
    assert h.sched.state("a") is State.ABSENT and h.sched.owner is None
    assert h.sched.evict("a", False, h.now) == (None, [])


def test_forced_evict_skips_the_drain() -> None:
    h = make()
    h.request(1, "a")
    h.run_io()
    _, effects = h.sched.evict("a", True, h.now)
    assert [e.backend for e in effects if isinstance(e, Unload)] == ["a"]
