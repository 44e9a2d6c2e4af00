"""The ``process`` strategy: free a managed worker's VRAM by stopping its process.

``load()`` starts the worker and returns once its health check passes (the broker bounds it by
``startTimeout``); ``unload()`` stops it (SIGTERM, SIGKILL later, every child reaped, port
closed); ``resident()`` says whether it runs (None while it starts or stops: it may hold
VRAM, so the scheduler counts it as taken). The scheduler does the rest: a request for a
stopped worker queues, the load starts it, and the request is admitted once it is healthy.

The broker bounds ``unload()`` by ``unloadTimeout``. So that a stop always *finishes* inside
that bound (the next backend must not load onto VRAM still held), an eviction gives the worker
``min(stopTimeout, 60% of unloadTimeout)`` to exit on SIGTERM before SIGKILL, keeping the rest
for the kill and the reaping. With the defaults (both 10s) that is 6s; raise ``unloadTimeout``
for a worker that needs longer to shut down cleanly. Should the broker's bound fire anyway, the
stop still completes: it runs in the supervisor's own task, shielded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..supervisor import WorkerError
from .base import Strategy

if TYPE_CHECKING:
    from ..supervisor import Supervisor

TERM_SHARE = 0.6  # of unloadTimeout, at most, for SIGTERM before SIGKILL during an eviction


class ProcessStrategy(Strategy):
    """Stop the managed worker to free its VRAM; start it again on demand."""

    name = "process"
    description = "Managed worker (`command:`): stop the process to free VRAM, start on demand"
    eviction_cost = 3

    def _supervisor(self) -> Supervisor:
        supervisor = self.ctx.supervisor
        if supervisor is None or self.backend.name not in supervisor.workers:
            raise WorkerError(
                f"{self.backend.name}: the process strategy needs a managed worker: give the "
                "backend `command:` (and run it under `gpubroker serve`)"
            )
        return supervisor

    def term_grace(self) -> float:
        """Seconds between SIGTERM and SIGKILL when the broker evicts this worker."""
        return max(0.5, min(self.backend.stop_timeout, self.ctx.unload_timeout * TERM_SHARE))

    async def unload(self) -> None:
        await self._supervisor().stop(self.backend.name, grace=self.term_grace())

    async def load(self) -> None:
        await self._supervisor().start(self.backend.name)

    async def resident(self) -> bool | None:
        return self._supervisor().resident(self.backend.name)
