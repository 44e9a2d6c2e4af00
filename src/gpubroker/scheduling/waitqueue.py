"""The scheduler's queue of waiting requests, indexed so that no event scans all of it.

Issue 16: with the queue a plain list, every event (a request, a tick, a release, a client
leaving) walked every waiter — to find a unit's first one, to count a unit's, to find who timed
out — so 10,000 waiting requests cost ~1 ms per event and ~5 s of event-loop time just to be
queued. What each question needs instead:

- arrival order over the whole queue (what the status page lists, what ``refuse_all`` answers):
  a dict by lease, in insertion order; removal by lease is O(1);
- a unit's waiters in arrival order and its first one (who is admitted next, what a plan is
  for): one ``OrderedDict`` per unit with waiters (O(1) first item and removal, where a plain
  dict's first item costs a walk past every entry deleted before it);
- the oldest waiter, for queue timeouts: a heap on (``since``, ``seq``) with lazy deletion — a
  waiter that left stays in the heap until it reaches the top, where it is dropped (the heap is
  rebuilt when stale entries outnumber the live ones, so it stays O(live));
- a waiter's place in line (what a waiting stream is told once a second): a Fenwick tree of
  the waiters still queued by ``seq``, O(log n) where counting from the front was O(n) per
  waiter per second.

A unit's index exists only while it has waiters, so units added or removed (``add_unit``, a
reload's ``remove_backend``, which refuses while anything is queued) touch nothing here.
The waiters are the scheduler's :class:`~gpubroker.scheduling.slots.Waiter` records, shared:
the scheduler may change a waiter's ``need``/``fresh`` in place, never its ``lease``,
``backend``, ``since`` or ``seq`` (the indexes' keys).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator

from gpubroker.scheduling.slots import Waiter


class _Places:
    """How many of the ``seq`` numbers marked come at or before a given one (a Fenwick tree
    over ``seq - base``; rebuilt past its end from the seqs still marked, from the least)."""

    def __init__(self) -> None:
        self.base = 1
        self.tree = [0] * 1025

    def mark(self, seq: int, delta: int, live: Iterator[int]) -> None:
        if seq - self.base + 1 >= len(self.tree):
            self._rebuild(seq, live)
        i = seq - self.base + 1
        tree = self.tree
        while i < len(tree):
            tree[i] += delta
            i += i & -i

    def upto(self, seq: int) -> int:
        i = min(seq - self.base + 1, len(self.tree) - 1)
        total = 0
        tree = self.tree
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total

    def _rebuild(self, seq: int, live: Iterator[int]) -> None:
        seqs = list(live)
        self.base = min(seqs, default=seq)
        size = 1024
        while size <= 2 * (seq - self.base + 1):
            size *= 2
        tree = [0] * (size + 1)
        for s in seqs:
            tree[s - self.base + 1] += 1
        for i in range(1, size + 1):  # counts to prefix sums in place, O(size)
            j = i + (i & -i)
            if j <= size:
                tree[j] += tree[i]
        self.tree = tree


class WaitQueue:
    """Waiting requests: iterated in arrival order, like the list it replaces."""

    __hash__ = None  # type: ignore[assignment]  # compared by content, like a list

    def __init__(self) -> None:
        self._all: dict[int, Waiter] = {}  # lease -> waiter, in arrival order
        self._units: dict[str, OrderedDict[int, Waiter]] = {}  # unit -> its waiters, in order
        self._heap: list[tuple[float, int, int]] = []  # (since, seq, lease), lazily pruned
        self._places = _Places()  # seqs still queued, for a waiter's place in line
        self._seq = 0

    # --- the list it replaces ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._all)

    def __bool__(self) -> bool:
        return bool(self._all)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(list(self._all.values()))  # a copy: callers may remove while iterating

    def __getitem__(self, place: int) -> Waiter:
        """The waiter at ``place`` in arrival order (O(place): for status pages, not events)."""
        return list(self._all.values())[place]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WaitQueue):
            return list(self._all.values()) == list(other._all.values())
        if isinstance(other, list):
            return list(self._all.values()) == other
        return NotImplemented

    def __repr__(self) -> str:
        return f"WaitQueue({list(self._all.values())!r})"

    # --- changes ----------------------------------------------------------------------------

    def append(self, waiter: Waiter) -> None:
        """Queue ``waiter`` last; it is given its ``seq``."""
        self._seq += 1
        waiter.seq = self._seq
        self._places.mark(waiter.seq, 1, (w.seq for w in self._all.values()))
        self._all[waiter.lease] = waiter
        self._units.setdefault(waiter.backend, OrderedDict())[waiter.lease] = waiter
        heapq.heappush(self._heap, (waiter.since, waiter.seq, waiter.lease))

    def remove(self, waiter: Waiter) -> None:
        """Take ``waiter`` out (it must be queued)."""
        del self._all[waiter.lease]
        mine = self._units[waiter.backend]
        del mine[waiter.lease]
        if not mine:
            del self._units[waiter.backend]
        self._places.mark(waiter.seq, -1, iter(()))
        if len(self._heap) > 64 and len(self._heap) > 2 * len(self._all):
            self._heap = [(w.since, w.seq, w.lease) for w in self._all.values()]
            heapq.heapify(self._heap)

    def clear(self) -> None:
        self._all.clear()
        self._units.clear()
        self._heap.clear()
        self._places = _Places()

    # --- questions --------------------------------------------------------------------------

    def get(self, lease: int) -> Waiter | None:
        return self._all.get(lease)

    def position(self, lease: int) -> int | None:
        """1-based place of ``lease`` in arrival order, or None."""
        waiter = self._all.get(lease)
        return None if waiter is None else self._places.upto(waiter.seq)

    def count(self, unit: str | None = None) -> int:
        """Waiters for ``unit`` (every unit when None)."""
        if unit is None:
            return len(self._all)
        mine = self._units.get(unit)
        return len(mine) if mine else 0

    def first(self, unit: str) -> Waiter | None:
        """``unit``'s first waiter in arrival order: the one admitted next."""
        mine = self._units.get(unit)
        return next(iter(mine.values())) if mine else None

    def of(self, unit: str) -> list[Waiter]:
        """``unit``'s waiters in arrival order (a copy)."""
        mine = self._units.get(unit)
        return list(mine.values()) if mine else []

    def firsts(self) -> list[Waiter]:
        """The first waiter of every unit with waiters, in arrival order."""
        heads = [next(iter(mine.values())) for mine in self._units.values()]
        heads.sort(key=lambda w: w.seq)
        return heads

    def oldest(self) -> Waiter | None:
        """The waiter queued earliest by its ``since`` (ties: by arrival): who times out first.
        Amortized O(log n): entries of waiters gone are dropped as they reach the top."""
        heap = self._heap
        while heap:
            _, seq, lease = heap[0]
            waiter = self._all.get(lease)
            if waiter is not None and waiter.seq == seq:
                return waiter
            heapq.heappop(heap)
        return None

    def take_expired(self, now: float, timeout: float) -> list[Waiter]:
        """Take out the waiters with ``now - since >= timeout``; they come in arrival order.
        O(k log n) for the k taken: the heap's top is all it reads beyond them."""
        heap = self._heap
        out: list[Waiter] = []
        while heap:
            since, seq, lease = heap[0]
            waiter = self._all.get(lease)
            if waiter is not None and waiter.seq == seq and not now - since >= timeout:
                break
            heapq.heappop(heap)
            if waiter is not None and waiter.seq == seq:
                out.append(waiter)
        for waiter in out:
            self.remove(waiter)
        out.sort(key=lambda w: w.seq)
        return out
