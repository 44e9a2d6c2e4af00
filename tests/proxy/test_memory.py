"""Memory a burst freed goes back to the system (proxy/memory.py), where the C library is glibc."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from gpubroker.proxy import memory

pytestmark = pytest.mark.anyio


def test_the_heap_is_trimmed_once_it_has_slack_and_not_again_until_it_grows() -> None:
    libc = memory._libc()
    if libc is None:
        pytest.skip("not glibc 2.33+")
    trimmer = memory.Trimmer(libc)
    # ~25 MB of 100 KiB blocks on glibc's heap, each followed by a small survivor, then the
    # big ones freed: holes in the middle of the heap, which free() never gives back itself
    pairs = [(bytearray(100 * 1024), bytearray(2048)) for _ in range(250)]
    kept = [small for _, small in pairs]
    del pairs
    before = memory._rss()
    assert trimmer.look()
    # the holes' pages went back (how many depends on what the process's heap held before)
    assert memory._rss() < before - 2**20
    assert not trimmer.look()  # nothing new: no collection, no trim
    assert len(kept) == 250


async def test_servers_share_one_trimming_task_that_ends_with_the_last() -> None:
    if memory._libc() is None:
        pytest.skip("not glibc 2.33+")
    async with memory.trimming():
        first = memory._task
        async with memory.trimming():
            assert memory._task is first and first is not None
        assert memory._task is first and not first.done()
    await asyncio.sleep(0)
    assert memory._task is None and first.cancelled()


def test_a_serving_process_freezes_its_start_up_heap_and_collects_rarely() -> None:
    """`gpubroker serve` once built: what is alive is frozen (no later pass walks it) and the
    thresholds raised; run in a child, since it changes the interpreter's collector for good."""
    import json
    import subprocess
    import sys

    code = (
        "import gc, json; from gpubroker.proxy import memory; "
        "before = gc.get_freeze_count(); memory.settle_heap(); "
        "print(json.dumps([before, gc.get_freeze_count(), gc.get_threshold()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=60)
    before, frozen, thresholds = json.loads(out.stdout)
    assert before == 0 and frozen > 1000  # the imported modules at least
    assert tuple(thresholds) == memory.SERVING_GC_THRESHOLDS


class _FakeLibc:
    """mallinfo2 and malloc_trim as the Trimmer calls them, with a free heap that stays put."""

    def __init__(self) -> None:
        self.trims = 0

    def mallinfo2(self) -> Any:
        return SimpleNamespace(fordblks=2**20)

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


def test_memory_still_growing_is_not_collected_until_it_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A queue or a burst still growing holds its memory: no full collection (a stall of the
    whole loop on a large heap) at each look while it grows, one once it has stopped."""
    rss = [100 * 2**20]
    monkeypatch.setattr(memory, "_rss", lambda: rss[0])
    collections: list[int] = []
    monkeypatch.setattr(memory.gc, "collect", lambda: collections.append(1) or 0)
    libc = _FakeLibc()
    trimmer = memory.Trimmer(libc)  # type: ignore[arg-type]
    for _ in range(5):  # 40 MiB more at every look
        rss[0] += 40 * 2**20
        assert not trimmer.look()
    assert trimmer.look()  # it stopped growing: now
    assert collections == [1] and libc.trims == 1
    assert not trimmer.look()  # and not again at the same size
