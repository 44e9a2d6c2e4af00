"""The job follower alone: readings reported up, leases released after a read, bad reads."""

from __future__ import annotations

import anyio
import pytest

from gpubroker.plugins.strategies.base import Job, Strategy
from gpubroker.scheduling import jobs as jobs_mod
from gpubroker.scheduling.jobs import JobFollower

pytestmark = pytest.mark.anyio


class Queue(Strategy):
    """A service whose queue is whatever the test puts in ``queue`` (``fail``: reads raise)."""

    name = "queue"

    def __init__(self) -> None:  # no context: the follower only reads jobs()
        self.queue: list[Job] = []
        self.fail = False
        self.reads = 0

    async def jobs(self) -> list[Job] | None:
        self.reads += 1
        if self.fail:
            raise ConnectionError("down")
        return list(self.queue)


class Plain(Strategy):
    name = "plain"

    def __init__(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def follower(
    strategy: Strategy, clock: Clock, timeout: float = 1.0
) -> tuple[JobFollower, list[tuple[str, int, int]]]:
    seen: list[tuple[str, int, int]] = []
    f = JobFollower(
        {"q": strategy, "p": Plain()},
        timeout=timeout,
        clock=clock,
        on_read=lambda b, jobs, before: seen.append((b, len(jobs), before)),
    )
    return f, seen


async def test_only_backends_with_a_queue_are_followed() -> None:
    f, _ = follower(Queue(), Clock())
    assert f.jobs == {"q": []}


async def test_a_reading_is_reported_with_the_count_before() -> None:
    s = Queue()
    f, seen = follower(s, Clock())
    s.queue = [Job("1", "running"), Job("2", "pending")]
    assert await f.read("q") == 2
    s.queue = []
    assert await f.read("q") == 0
    assert seen == [("q", 2, 0), ("q", 0, 2)]


async def test_since_is_when_first_seen_and_kept_across_reads() -> None:
    s = Queue()
    f, _ = follower(s, Clock())
    s.queue = [Job("1", "running"), Job("2", "pending", since=5.0)]
    await f.read("q")
    first = f.jobs["q"][0].since
    assert first is not None and f.jobs["q"][1].since == 5.0
    await anyio.sleep(0.01)
    await f.read("q")
    assert f.jobs["q"][0].since == first


async def test_a_reading_begun_after_a_moment_is_shared() -> None:
    s = Queue()
    clock = Clock()
    f, _ = follower(s, clock)
    clock.now = 2.0
    await f.read("q")
    assert await f.read("q", after=1.0) == 0 and s.reads == 1  # the one at 2.0 will do
    await f.read("q", after=3.0)
    assert s.reads == 2


async def test_an_unreadable_queue_keeps_its_reading_then_counts_empty() -> None:
    s = Queue()
    clock = Clock()
    f, seen = follower(s, clock, timeout=1.0)
    s.queue = [Job("1", "running")]
    await f.read("q")
    s.fail = True
    assert await f.read("q") == 1  # cannot tell yet: the last reading stands
    clock.now = 0.5
    assert await f.read("q") == 1
    clock.now = 1.5
    assert await f.read("q") == 0  # unreachable for unloadTimeout: its jobs are gone
    assert seen == [("q", 1, 0), ("q", 0, 1)]
    s.fail = False
    s.queue = [Job("2", "pending")]
    assert await f.read("q") == 1  # readable again: the failure is forgotten


async def test_settle_releases_after_the_read_and_follows_until_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jobs_mod, "JOB_POLL", 0.01)
    s = Queue()
    f, seen = follower(s, Clock())
    s.queue = [Job("1", "running")]
    released: list[int] = []

    def release() -> None:
        released.append(len(f.jobs["q"]))  # the job is counted before the lease ends

    async with anyio.create_task_group() as tg:
        await f.settle("q", -1.0, release, tg)
        assert released == [1]
        await anyio.sleep(0.05)
        assert s.reads >= 2  # followed while the job runs
        s.queue = []
    assert seen[-1] == ("q", 0, 1)  # the follower ended with the queue empty


async def test_settle_releases_even_when_the_read_fails() -> None:
    class Broken(Queue):
        async def jobs(self) -> list[Job] | None:
            raise RuntimeError("bad plugin")

    f, _ = follower(Broken(), Clock(), timeout=0.0)
    released: list[bool] = []
    async with anyio.create_task_group() as tg:
        await f.settle("q", -1.0, lambda: released.append(True), tg)
    assert released == [True]
