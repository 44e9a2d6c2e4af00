"""Memory a burst freed goes back to the system (proxy/memory.py), where the C library is glibc."""

from __future__ import annotations

import asyncio

import pytest

from gpubroker.proxy import memory

pytestmark = pytest.mark.anyio


def test_the_heap_is_trimmed_only_past_the_slack() -> None:
    libc = memory._libc()
    if libc is None:
        pytest.skip("not glibc 2.33+")
    blocks = [bytearray(64 * 1024) for _ in range(200)]  # ~13 MB on glibc's heap, then freed
    del blocks
    assert not memory.trim_if_slack(libc, slack=2**62)  # never past an absurd slack
    assert memory.trim_if_slack(libc, slack=0)
    assert libc.mallinfo2().fordblks < 2 * 2**20  # what was free went back


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
