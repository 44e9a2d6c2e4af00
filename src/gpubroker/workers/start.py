"""The one on-demand start of a managed worker.

A managed worker (``command:``) is started on demand in exactly one place: the broker's load
effect calls :func:`start_before_load` before the backend's strategy's ``load()``, whatever the
strategy (a vLLM with ``command:`` is started, then woken). Every way to want a worker running
goes through that effect: a request that queues for it, and ``gpubroker workers
start|ensure|restart``, which are a preload (``observe/worker_routes.py``). The supervisor starts
workers on its own only for ``autostart`` and to restart after a crash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpubroker.workers.supervisor import Supervisor


async def start_before_load(supervisor: Supervisor | None, backend: str) -> None:
    """The one on-demand start: run ``backend``'s process and wait for its health check when
    it is a managed worker (at once if it is ready); nothing for any other backend.

    The broker's load effect calls it before the strategy's ``load()``; raises
    :class:`WorkerError` when the worker cannot be started.
    """
    if supervisor is not None and supervisor.manages(backend):
        await supervisor.start(backend)
