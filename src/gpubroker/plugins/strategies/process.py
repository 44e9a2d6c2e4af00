"""The ``process`` strategy: free a managed worker's VRAM by stopping its process.

``load()`` confirms that the one on-demand start before it (``workers/start.py``) left the worker
ready (the broker bounds both by ``startTimeout``); ``unload()`` stops it (SIGTERM, SIGKILL later,
every child reaped, port closed); ``resident()`` says whether it runs (None while it starts or
stops: it may hold VRAM, so the scheduler counts it as taken). The scheduler does the rest: a
request for a stopped worker queues, the load starts it, and the request is admitted once it is
healthy.

How a stop fits ``unloadTimeout`` (the one place this is told). The broker bounds ``unload()``
by ``unloadTimeout``, so an eviction gives the stop one deadline, ``STOP_SHARE`` (90%) of it,
shared by every phase in turn: SIGTERM gets ``stopTimeout`` but no more than ``TERM_SHARE``
(60%) of ``unloadTimeout``; then SIGKILL, reaping the tree, the port check and (with telemetry)
the VRAM check share what is left of the deadline; the last 10% lets the stop report before
the broker's bound fires. With the defaults (both 10s): 6s for SIGTERM, the whole stop within
9s. A check the deadline cuts short is reported as not confirmed (``procs.stop_tree``), and the
broker's own check of the freed memory still follows. The signals are never skipped, and should
the broker's bound fire anyway, the stop still completes: it runs in the supervisor's own task,
shielded. Raise ``unloadTimeout`` for a worker that needs longer to shut down cleanly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpubroker.errors import WorkerError
from gpubroker.plugins.strategies.base import Strategy

if TYPE_CHECKING:
    from gpubroker.workers.supervisor import Supervisor

TERM_SHARE = 0.6  # of unloadTimeout, at most, for SIGTERM before SIGKILL during an eviction
STOP_SHARE = 0.9  # of unloadTimeout for the whole stop: signals, reaping and its checks


class ProcessStrategy(Strategy):
    """Stop the managed worker to free its VRAM; start it again on demand."""

    name = "process"
    description = "Managed worker (`command:`): stop the process to free VRAM, start on demand"
    frees_by = "stop"
    eviction_cost = 3

    def _supervisor(self) -> Supervisor:
        supervisor = self.ctx.supervisor
        if supervisor is None or not supervisor.manages(self.backend.name):
            raise WorkerError(
                f"{self.backend.name}: the process strategy needs a managed worker: give the "
                "backend `command:` (and run it under `gpubroker serve`)"
            )
        return supervisor

    def term_grace(self) -> float:
        """Seconds between SIGTERM and SIGKILL when the broker evicts this worker."""
        return min(self.backend.stop_timeout, self.ctx.unload_timeout * TERM_SHARE)

    def stop_limit(self) -> float:
        """Seconds the whole stop may take when the broker evicts this worker."""
        return self.ctx.unload_timeout * STOP_SHARE

    async def unload(self) -> None:
        name = self.backend.name
        await self._supervisor().stop(name, grace=self.term_grace(), limit=self.stop_limit())

    async def load(self) -> None:
        """Confirm the worker is ready: the broker started it just before (see
        :func:`start_before_load`); one that went away since then fails the load."""
        supervisor = self._supervisor()
        if supervisor.resident(self.backend.name) is not True:
            state = supervisor.worker(self.backend.name).state.value
            raise WorkerError(f"{self.backend.name}: {state} when it should be ready")

    async def resident(self) -> bool | None:
        return self._supervisor().resident(self.backend.name)
