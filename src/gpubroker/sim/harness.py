"""Run an ASGI app on a loopback port for the length of an ``async with`` block.

Used by the emulator tests, the broker's tests and ``gpubroker demo``. The app's lifespan runs
before the block is entered, so an emulator that fails to start (vLLM without enough free
memory) raises :class:`StartupFailed` from the ``async with`` itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from gpubroker.proxy.listener import listen, serve


class StartupFailed(RuntimeError):
    """The app's lifespan startup failed; the message carries the app's own error text."""


class _LifespanWatch:
    """Wraps an app to learn when its lifespan startup has completed or failed."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.settled = anyio.Event()
        self.failure: str | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def watched_send(message: Any) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.settled.set()
            elif message["type"] == "lifespan.startup.failed":
                self.failure = message.get("message") or "lifespan startup failed"
                self.settled.set()
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            self.settled.set()  # an app without lifespan support returns or raises at once


@asynccontextmanager
async def running(
    app: Any, *, host: str = "127.0.0.1", port: int = 0, graceful_timeout: float = 1.0
) -> AsyncIterator[str]:
    """Serve ``app`` on ``host:port`` (port 0 = any free port); yield its base URL.

    On exit the server stops admitting, gives in-flight requests ``graceful_timeout`` seconds,
    and runs the app's lifespan shutdown, even when the block was cancelled.
    """
    listener = listen(host, port)
    watch = _LifespanWatch(app)
    stop = anyio.Event()

    errors: list[Exception] = []

    async def serve_until_stopped() -> None:
        try:
            await serve(watch, listener, stop.wait, graceful_timeout=graceful_timeout)
        except Exception as exc:
            # After a failed startup Hypercorn raises LifespanFailureError; the watch already
            # holds the app's own reason, which is what callers want to see.
            if watch.failure is None:
                errors.append(exc)
        finally:
            watch.settled.set()

    # A plain asyncio task rather than a task group around the ``yield``: exceptions from the
    # block then reach the caller as themselves, not wrapped in an ExceptionGroup.
    task = asyncio.get_running_loop().create_task(serve_until_stopped())
    try:
        await watch.settled.wait()
        if watch.failure is not None:
            raise StartupFailed(watch.failure)
        if errors:
            raise errors[0]
        yield listener.url
    finally:
        stop.set()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(graceful_timeout + 5.0):
                await asyncio.wait({task})
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
    if errors:
        raise errors[0]
