"""The scheduler with thousands of waiters: its indexes (``waitqueue``, ``unitindex``) keep the
order and the deadlines a short list had — FIFO within a unit, priority between units, every
queue timeout at its own deadline — and a queue of 10,000 drains."""

from __future__ import annotations

import random

from gpubroker.scheduling.effects import Admit, Load, Refuse, Unload, WaitIdle
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler
from gpubroker.scheduling.slots import Waiter
from gpubroker.scheduling.waitqueue import WaitQueue
from scheduler_harness import Harness

G = 2**30


def exclusive(
    names: str, limit: int | None = None, *, hold_time: float, queue_timeout: float = 120.0
) -> Harness:
    """``names`` on one GPU under ``exclusive``, the first resident; ``limit``: the others'
    ``maxConcurrency``."""
    specs = [BackendSpec(n, max_concurrency=None if i == 0 else limit) for i, n in enumerate(names)]
    sched = Scheduler(specs, policy="exclusive", hold_time=hold_time, queue_timeout=queue_timeout)
    for n in names:
        sched.reconciled(n, n == names[0])
    return Harness(sched)


def serve_all(h: Harness, first: int = 0) -> list[Admit]:
    """Carry out the I/O effects from ``h.effects[first:]`` on (instant services) and end
    each lease as it is admitted, until nothing is left to do; the admissions, in order
    (``Harness.run_io`` rereads every effect from the start: too slow for 10,000)."""
    admits: list[Admit] = []
    done = first
    while done < len(h.effects):
        e = h.effects[done]
        done += 1
        if isinstance(e, WaitIdle):
            h.feed(h.sched.idle(e.swap, e.backend, h.now))
        elif isinstance(e, Unload):
            h.feed(h.sched.unloaded(e.swap, e.backend, None, h.now))
        elif isinstance(e, Load):
            h.feed(h.sched.loaded(e.swap, e.backend, None, h.now))
        elif isinstance(e, Admit):
            admits.append(e)
            h.release(e.lease)
    return admits


# --- the queue itself -----------------------------------------------------------------------


def test_the_queue_reads_like_the_list_it_replaced() -> None:
    q = WaitQueue()
    waiters = [Waiter(i, "ab"[i % 2], float(i)) for i in range(6)]
    for w in waiters:
        q.append(w)
    assert list(q) == waiters and q == waiters and len(q) == 6 and q
    assert q[2] is waiters[2] and q.position(3) == 4 and q.position(99) is None
    assert [w.lease for w in q.of("a")] == [0, 2, 4] and q.count("b") == 3 and q.count() == 6
    q.remove(waiters[0])
    assert q.first("a") is waiters[2] and [w.lease for w in q.firsts()] == [1, 2]
    for w in list(q):
        q.remove(w)
    assert not q and q == [] and q.first("a") is None and q.oldest() is None and q.firsts() == []


def test_the_oldest_and_the_expired_go_by_since_whatever_order_they_came_in() -> None:
    q = WaitQueue()
    sinces = [5.0, 1.0, 3.0, 1.0, 9.0]  # a clock handed in need not be monotonic
    for i, since in enumerate(sinces):
        q.append(Waiter(i, "a", since))
    oldest = q.oldest()
    assert oldest is not None and oldest.lease == 1  # the earliest since, first come on a tie
    q.remove(oldest)
    oldest = q.oldest()  # the entry of the one gone is passed over
    assert oldest is not None and oldest.lease == 3
    taken = q.take_expired(now=10.0, timeout=6.9)  # since <= 3.1
    assert [w.lease for w in taken] == [2, 3]  # in arrival order
    assert [w.lease for w in q] == [0, 4] and q.take_expired(10.0, 6.9) == []


def test_the_heap_stays_the_size_of_the_queue_as_waiters_come_and_go() -> None:
    q = WaitQueue()
    for i in range(10_000):
        w = Waiter(i, "a", float(i))
        q.append(w)
        if i > 10:
            victim = q.get(i - 10)
            assert victim is not None
            q.remove(victim)  # admitted or gone, never reaching the heap's top
    assert len(q) == 11 and len(q._heap) <= 2 * 64


# --- the scheduler with thousands waiting ---------------------------------------------------


def test_thousands_of_waiters_are_admitted_in_arrival_order_within_each_backend() -> None:
    rng = random.Random(16)
    h = exclusive("abc", 3, hold_time=0.0)
    h.request(0, "a")
    order: dict[str, list[int]] = {"b": [], "c": []}
    for lease in range(1, 3001):
        h.now += rng.choice([0.0, 0.001])  # ties in time, not in arrival
        backend = rng.choice("bc")
        order[backend].append(lease)
        h.request(lease, backend)
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    for e in serve_all(h):
        got[e.backend].append(e.lease)
    assert got == {"a": [0], **order}
    assert not h.pending(Refuse) and not h.sched.plans and not h.sched.queue


def test_the_highest_priority_waits_least_with_thousands_behind_the_others() -> None:
    specs = [BackendSpec("a"), BackendSpec("low"), BackendSpec("high", priority=5)]
    sched = Scheduler(specs, policy="exclusive", hold_time=100.0, aging=0.0)
    for s in specs:
        sched.reconciled(s.name, s.name == "a")
    h = Harness(sched)
    h.request(0, "a")
    for lease in range(1, 2001):
        h.request(lease, "low")
    h.request(5000, "high")  # came last, while "a" still served in its hold
    h.release(0)
    h.run_io()
    assert h.admitted() == [0, 5000]


def test_every_queue_timeout_fires_at_its_own_deadline_among_thousands() -> None:
    rng = random.Random(7)
    h = exclusive("ab", queue_timeout=10.0, hold_time=1e9)
    h.request(0, "a")  # holds the GPU throughout
    since: dict[int, float] = {}
    for lease in range(1, 2001):
        h.now = lease / 64  # exact in binary: since + timeout - since == timeout
        h.request(lease, "b")
        since[lease] = h.now
    for lease in rng.sample(sorted(since), 500):  # clients that left: no deadline of theirs
        h.feed(h.sched.cancel(lease, h.now))
        del since[lease]
    refused: list[int] = []
    while (deadline := h.sched.next_deadline()) is not None and h.sched.queue:
        oldest = min(since[w.lease] for w in h.sched.queue)
        assert deadline == oldest + 10.0
        h.now = deadline
        timed_out = [e for e in h.feed(h.sched.tick(h.now)) if isinstance(e, Refuse)]
        assert timed_out and all(e.code == "queue_timeout" for e in timed_out)
        assert all(h.now - since[e.lease] >= 10.0 for e in timed_out)
        assert all(h.now - w.since < 10.0 for w in h.sched.queue)  # nobody early, nobody late
        refused += [e.lease for e in timed_out]
    assert refused == sorted(since)  # each once, in arrival order


def test_ten_thousand_waiters_drain_through_swaps() -> None:
    h = exclusive("abcd", 8, hold_time=0.0)
    h.request(0, "a")
    for lease in range(1, 10_001):
        h.request(lease, "bcd"[lease % 3])
    admits = serve_all(h)
    assert sorted(e.lease for e in admits) == list(range(10_001))
    assert not h.pending(Refuse) and not h.sched.queue and not h.sched.plans
    assert h.sched.next_deadline() is None


def test_a_place_in_line_is_counted_among_those_still_queued() -> None:
    rng = random.Random(3)
    q = WaitQueue()
    live: list[Waiter] = []
    for lease in range(5_000):  # past the first size of its tree, with most gone meanwhile
        w = Waiter(lease, "ab"[lease % 2], float(lease))
        q.append(w)
        live.append(w)
        if rng.random() < 0.6:
            gone = live.pop(rng.randrange(len(live)))
            q.remove(gone)
            assert q.position(gone.lease) is None
        if lease % 97 == 0:
            assert [q.position(w.lease) for w in live] == list(range(1, len(live) + 1))
    q.clear()
    q.append(Waiter(9, "a", 0.0))
    assert q.position(9) == 1 and q[0].lease == 9
