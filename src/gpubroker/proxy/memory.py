"""Giving memory back after a burst: glibc's free heap returned to the system when it grows.

Why RSS stays above its baseline after 1,000 concurrent streams ended (measured, 2-core box,
uvicorn): nothing of ours is kept (no lease, no buffer, and idle upstream connections close
when they expire), it is the allocators. CPython's small-object allocator (pymalloc) returns a
1 MiB arena only when every block in it is free. Of what the burst allocated, about a thousand
small blocks (~90 KB) outlive it, most of them objects the C extensions keep for reuse (asyncio's
future iterators, uvloop's timer and callback handles: ~250 of each), the rest live timers; a
few pools of them in each arena pin all of the burst's arenas (none of 12-18 came back, with
11-18 MB of free pools inside them). The rest is glibc's heap, whose freed pages stay mapped until
``malloc_trim``, and cyclic garbage the burst left that waits for a full collection. So
:class:`Trimmer` collects and trims once memory grew. Run the broker with ``PYTHONMALLOC=malloc``
(all objects on glibc's heap) and that gives back nearly all of it (61 -> 87 -> 66 MiB after
1,000 streams); with pymalloc, what its pinned arenas hold stays. Off where glibc is not the C
library.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
from collections.abc import AsyncIterator

log = logging.getLogger("gpubroker.proxy.memory")

INTERVAL = 5.0  # s between looks at the heap (one mallinfo2 call: microseconds)
SLACK = 4 * 2**20  # free heap bytes worth a trim
GROWTH = 16 * 2**20  # RSS grown since the last trim worth a look for garbage
PAGE = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc (musl, macOS), or glibc before 2.33
        return None
    return libc


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * PAGE


class Trimmer:
    """Looks every ``INTERVAL`` s: once glibc's free heap grew by ``SLACK`` bytes, or RSS by
    ``GROWTH`` and then stopped growing, since the last trim, collects cyclic garbage (a
    burst's requests leave some, which only a full collection frees: that is what kept glibc
    from giving pages back) and returns the free heap with ``malloc_trim``. A full collection
    costs milliseconds (more on a large heap), at most once per look, only after memory grew,
    and not while it still grows."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self.libc = libc
        self.since = self.last = _rss()  # RSS after the last trim; at the last look
        self.free = 0  # glibc's free heap bytes after it (trimmed pages still count as free)

    def look(self) -> bool:
        free = self.libc.mallinfo2().fordblks
        rss, last = _rss(), self.last
        self.last = rss
        # RSS that grew counts once it stops growing: while a burst or a queue still grows,
        # the memory is in use, and a full collection of a large heap at every look would
        # stall the loop (every stream's latency) for nothing to give back.
        grown = rss >= self.since + GROWTH and rss <= last
        if free <= self.free + SLACK and not grown:
            return False
        gc.collect()
        self.libc.malloc_trim(0)
        self.since = self.last = _rss()
        self.free = self.libc.mallinfo2().fordblks
        return True


# The collector's thresholds once serving: (gen0, gen1, gen2). Most of a request's objects are
# freed by reference counting; a young-generation pass every 700 allocations (CPython's
# default) runs several times per request, and every full pass walks the whole heap. A full
# pass still comes every ~50M allocations (tens of thousands of requests): cyclic garbage stays
# bounded where no Trimmer runs (not glibc) or while memory keeps growing.
SERVING_GC_THRESHOLDS = (10_000, 50, 100)


def settle_heap() -> None:
    """Once a broker process is up: collect, freeze what is alive (modules, apps, the config:
    never garbage) so later passes do not walk it, and raise the collector's thresholds, so
    full passes are rare (cyclic garbage waits for them, or for the :class:`Trimmer`'s
    collection after memory grew). For a process that serves (``gpubroker serve``, the
    bench's brokers), not a library call: it changes the interpreter's collector for good.
    Measured in one run of ``bench/proxy.py`` (uvicorn, 64 connections, small GET): p99 50 ->
    12 ms, req/s +30%."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLDS)


_users = 0
_task: asyncio.Task[None] | None = None


async def _trim_loop(libc: ctypes.CDLL) -> None:
    trimmer = Trimmer(libc)
    while True:
        await asyncio.sleep(INTERVAL)
        trimmer.look()


@contextlib.asynccontextmanager
async def trimming() -> AsyncIterator[None]:
    """While any server runs: one trimming task per process (servers share it)."""
    global _task, _users
    libc = _libc()
    if libc is None:
        yield
        return
    _users += 1
    if _task is None or _task.done():
        _task = asyncio.get_running_loop().create_task(_trim_loop(libc))
    try:
        yield
    finally:
        _users -= 1
        if _users == 0 and _task is not None:
            _task.cancel()
            _task = None
