"""The part every emulator shares: an ASGI app whose lifespan owns the background work.

Background work (a model load that outlives the request that asked for it, an expiry timer, a
ComfyUI worker) runs in a task group opened by the app's lifespan, so it ends when the server
does and nothing leaks. Serve ``emulator.app`` with a server that runs the ASGI lifespan
(Hypercorn does; :func:`gpubroker.sim.running` does it for you).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from gpubroker.sim.gpu import SimGPU


class NotStarted(RuntimeError):
    """The emulator's app was called without its lifespan having run."""


class Changed:
    """A re-armable "something changed" signal: waiters wake on the next :meth:`notify`."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()

    async def wait(self) -> None:
        """Wait for the next notify (bound it with ``anyio.move_on_after`` where needed)."""
        await self._event.wait()


class EmulatedService:
    """Base class: a Starlette app plus a task group bound to the app's lifespan."""

    def __init__(self, gpu: SimGPU, owner: str) -> None:
        self.gpu = gpu
        self.owner = owner
        """The process name this service allocates under on the :class:`SimGPU`."""
        self._tg: TaskGroup | None = None
        self.app = Starlette(
            routes=list(self._routes()),
            middleware=list(self._middleware()),
            lifespan=self._lifespan,
        )

    def _routes(self) -> Sequence[BaseRoute]:
        raise NotImplementedError

    def _middleware(self) -> Sequence[Middleware]:
        """What runs before every route (a service's own Host or Origin checks); none here."""
        return ()

    async def startup(self) -> None:
        """Runs when the server starts, inside the lifespan; override to load eagerly."""

    async def _on_started(self) -> None:
        """Runs once the task group is open; override to start long-lived tasks."""

    def _on_stopped(self) -> None:
        """Runs when the server stops, before the GPU memory is released; override to reset."""

    @asynccontextmanager
    async def _lifespan(self, _app: Any) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                await self.startup()
                await self._on_started()
                yield
            finally:
                self._tg = None
                tg.cancel_scope.cancel()
                self._on_stopped()
                # The process is gone: whatever it held on the card is released with it.
                self.gpu.free(self.owner)

    def require_running(self) -> TaskGroup:
        """The lifespan's task group; :class:`NotStarted` when the lifespan has not run."""
        if self._tg is None:
            raise NotStarted(
                f"{type(self).__name__} is not running: serve its app with the ASGI lifespan "
                "(e.g. `async with gpubroker.sim.running(emulator.app)`)"
            )
        return self._tg

    def spawn(self, func: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``func(*args)`` in the background until it returns or the server stops."""
        self.require_running().start_soon(func, *args)
