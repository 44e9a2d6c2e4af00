"""Following the services' own queues: work a service accepted and runs after its HTTP call.

ComfyUI answers a prompt at once and renders it later, so a lease alone would let its GPU look
idle while it works. For every backend whose strategy reports a queue (``Strategy.jobs``) the
broker's :class:`JobFollower` keeps the last reading of that queue: read as each lease ends, then
every ``JOB_POLL`` seconds while it holds jobs, each reading handed up to the broker (which counts
it into the scheduler and publishes it). The follower owns no task group: the broker passes its
own while it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping

import anyio
from anyio.abc import TaskGroup

from gpubroker.plugins.strategies.base import Job, Strategy, tracks_jobs

log = logging.getLogger("gpubroker.scheduling.broker")  # its lines, as before it moved here

JOB_POLL = 0.1  # seconds between queue reads while a service has jobs of its own in flight
JOB_ASK_LIMIT = 5.0  # at most this long for one queue read; a service that hangs is "unknown"

JobsRead = Callable[[str, list[Job], int], None]
"""News of one reading: the backend, the jobs it holds now, and how many it held before."""


class JobFollower:
    """The last reading of each queue-reporting backend's own queue, and the reads that keep it.

    ``timeout`` is the config's ``unloadTimeout``: no read takes longer (nor ``JOB_ASK_LIMIT``),
    and a queue that cannot be read keeps its last reading that long before it counts as empty.
    """

    def __init__(
        self,
        strategies: Mapping[str, Strategy],
        *,
        timeout: float,
        clock: Callable[[], float],
        on_read: JobsRead,
    ) -> None:
        self.strategies = {n: s for n, s in strategies.items() if tracks_jobs(s)}
        self.timeout = timeout
        self.clock = clock
        self.on_read = on_read
        # The services' own queues (ComfyUI's), as last read; only backends that report one.
        self.jobs: dict[str, list[Job]] = {name: [] for name in self.strategies}
        self._watch: set[str] = set()  # backends whose queue is being followed now
        self._failing: dict[str, float] = {}  # backend -> since when its queue is unreadable
        self._lock = {name: anyio.Lock() for name in self.jobs}
        self._read_at: dict[str, float] = {}  # backend -> when its last read began

    def follow_all(self, tg: TaskGroup) -> None:
        """Follow every queue once: work queued before the broker started is in flight too."""
        for name in self.jobs:
            self.follow(name, tg)

    async def settle(
        self, backend: str, ended: float, release: Callable[[], None], tg: TaskGroup
    ) -> None:
        """Call ``release`` (a lease of ``backend`` that ended at ``ended``) only after reading
        its queue, so its job is counted before the lease stops counting: no instant in which
        the owner looks idle to the hold. A queue that holds jobs is followed from then on."""
        try:
            if await self.read(backend, after=ended):
                self.follow(backend, tg, wait_first=True)
        finally:  # cancelled (the broker stops) or a plugin's answer was bad: still released
            release()

    async def read(self, backend: str, *, after: float | None = None) -> int:
        """Read ``backend``'s queue and report it; returns how many jobs it holds.

        Reads of one backend take turns, so an older answer never overwrites a newer one, and
        a caller that needs a reading begun ``after`` a moment shares one that did.
        """
        async with self._lock[backend]:
            if after is not None and self._read_at.get(backend, float("-inf")) >= after:
                return len(self.jobs[backend])
            self._read_at[backend] = self.clock()
            return await self._read_now(backend)

    async def _read_now(self, backend: str) -> int:
        jobs: list[Job] | None = None
        try:
            with anyio.fail_after(min(self.timeout, JOB_ASK_LIMIT)):
                jobs = [
                    j for j in await self.strategies[backend].jobs() or [] if isinstance(j, Job)
                ]
        except Exception as exc:
            # Cannot tell: keep the last reading for a while, but a service that stays
            # unreachable has lost its queue, and jobs nobody can see must not hold the GPU.
            failing = self._failing.setdefault(backend, self.clock())
            if self.clock() - failing < self.timeout:
                log.debug("%s: cannot read its queue (%s)", backend, exc)
                return len(self.jobs[backend])
            log.warning("%s: its queue cannot be read (%s); counting it as empty", backend, exc)
        self._failing.pop(backend, None)
        # ComfyUI stamps no time on a job: "since" is when we first saw it, kept across reads.
        seen = {j.id: j.since for j in self.jobs[backend]}
        now = time.time()
        jobs = [
            j if j.since is not None else dataclasses.replace(j, since=seen.get(j.id) or now)
            for j in jobs or []
        ]
        before = len(self.jobs[backend])
        self.jobs[backend] = jobs
        self.on_read(backend, jobs, before)
        return len(jobs)

    def follow(self, backend: str, tg: TaskGroup, *, wait_first: bool = False) -> None:
        """Read ``backend``'s queue every JOB_POLL seconds until it is empty (one follower)."""
        if backend in self._watch:
            return
        self._watch.add(backend)

        async def follow() -> None:
            try:
                if wait_first:
                    await anyio.sleep(JOB_POLL)
                while await self.read(backend):
                    await anyio.sleep(JOB_POLL)
            finally:
                self._watch.discard(backend)

        tg.start_soon(follow)

    def track(self, strategies: Mapping[str, Strategy]) -> None:
        """A reload: the queues of ``strategies`` are followed from now on (a new one starts
        empty); one no longer there is dropped, unless it is being followed right now."""
        self.strategies = {n: s for n, s in strategies.items() if tracks_jobs(s)}
        for name in self.strategies:
            self.jobs.setdefault(name, [])
            self._lock.setdefault(name, anyio.Lock())
        for name in [n for n in self.jobs if n not in self.strategies and n not in self._watch]:
            del self.jobs[name]
            self._lock.pop(name, None)
            self._failing.pop(name, None)
            self._read_at.pop(name, None)
