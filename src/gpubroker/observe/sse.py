"""``GET /events``: every wire event on the bus as Server-Sent Events.

``?backend=`` keeps one backend's events; ``?request=<id>`` follows one request from the queue
to its first byte, with the swap that made room for it. A reader that falls behind loses the
newest events, never slows the publisher, and is told how many it lost (``dropped``). The
stream ends after ``shutting_down``, so it does not hold up a graceful stop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from gpubroker.events import BrokerShuttingDown, Dropped, Event, EventBus, SwapStarted, WireEvent

EVENT_BUFFER = 256  # events kept for one slow /events reader before it starts losing them
HEARTBEAT = 15.0  # seconds of silence after which /events sends a comment line

T = TypeVar("T")


class EventStream:
    """The ``/events`` endpoint over one bus."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    async def endpoint(self, request: Request) -> Response:
        backend = request.query_params.get("backend")
        wanted = request.query_params.get("request")
        feed: EventFeed[WireEvent] = EventFeed()
        swaps: set[int] = set()  # swaps started for the followed request

        def keep(event: WireEvent) -> bool:
            if backend is not None and event.backend != backend:
                return False
            if wanted is None:
                return True
            if isinstance(event, SwapStarted) and wanted in map(str, event.requests):
                swaps.add(event.swap)
            return str(event.lease) == wanted or getattr(event, "swap", None) in swaps

        def push(event: Event) -> None:
            if isinstance(event, WireEvent):
                feed.push(event)

        async def stream() -> AsyncIterator[bytes]:
            unsubscribe = self.bus.subscribe(push, (WireEvent,))
            try:
                yield b": connected\n\n"
                while True:
                    event = await feed.next(HEARTBEAT)
                    if lost := feed.take_dropped():
                        yield _sse(Dropped(count=lost))
                    if event is None:
                        yield b": ping\n\n"
                    elif isinstance(event, BrokerShuttingDown):
                        yield _sse(event)
                        return  # end the stream, so it does not hold up a graceful stop
                    elif keep(event):
                        yield _sse(event)
            finally:
                unsubscribe()
                feed.close()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )


def _sse(event: WireEvent) -> bytes:
    return f"event: {event.kind}\ndata: {json.dumps(event.to_json())}\n\n".encode()


class EventFeed(Generic[T]):
    """One ``/events`` reader's buffer. The bus pushes without ever waiting: when the
    reader falls ``capacity`` events behind, newer events are dropped and counted, and the
    reader is told how many it lost once it catches up."""

    def __init__(self, capacity: int | None = None) -> None:
        size = EVENT_BUFFER if capacity is None else capacity
        self._send, self._receive = anyio.create_memory_object_stream[T](size)
        self.dropped = 0

    def push(self, event: T) -> None:
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    def take_dropped(self) -> int:
        """How many were dropped since the last call (the reader is about to be told)."""
        lost, self.dropped = self.dropped, 0
        return lost

    async def next(self, wait: float) -> T | None:
        """The next event, or None after ``wait`` seconds without one."""
        with anyio.move_on_after(wait):
            return await self._receive.receive()
        return None

    def close(self) -> None:
        self._send.close()
        self._receive.close()
