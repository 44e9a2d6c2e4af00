"""The status + admin app on ``statusPort``: what the GPU is doing, and verbs for the CLI.

``GET /`` keeps OneGPU4All's field names (so its dashboards keep working) and adds ours: the
GPUs as telemetry sees them, each backend's measured VRAM next to its declared one, the queue
and the active warnings. ``GET /metrics`` is the same in Prometheus' format and ``GET /events``
streams every scheduler event as Server-Sent Events.

Admin verbs need ``Authorization: Bearer <adminToken>`` when a token is set, and are refused
outright when the port binds beyond loopback without one; read-only routes stay open. In front
of every route, :class:`~gpubroker.observe.guard.ListenerGuard` keeps web pages out: only Host names
this port answers to (DNS rebinding), no foreign Origin on a verb, no CORS, JSON bodies only.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gpubroker.errors import ClientError, Forbidden, Unauthorized, UnknownBackend
from gpubroker.observe.guard import HostPolicy, ListenerGuard, is_loopback
from gpubroker.observe.metrics import Metrics
from gpubroker.observe.monitor import Monitor
from gpubroker.observe.readmodel import StatusView, read
from gpubroker.responses import exception_handlers, json_object
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.scheduler import State
from gpubroker.workers.routes import worker_routes

EVENT_BUFFER = 256  # events kept for one slow /events reader before it starts losing them
HEARTBEAT = 15.0  # seconds of silence after which /events sends a comment line


class StatusApp:
    """Builds the Starlette app; ``health`` is filled in by the server's prober."""

    def __init__(self, broker: Broker, monitor: Monitor | None = None) -> None:
        self.broker = broker
        self.monitor = monitor
        self.health: dict[str, dict[str, Any]] = {}
        if monitor is not None:
            monitor.health = self.health
        self.metrics = Metrics(broker, monitor, self.health)
        cfg = broker.config
        self.token = cfg.admin_token
        self.open_admin = self.token is None and is_loopback(cfg.bind)
        self.routes = Starlette(
            routes=[
                Route("/", self.index),
                Route("/health", self.healthz),
                Route("/api/status", self.index),
                Route("/api/unload", self.unload, methods=["POST"]),
                Route("/api/swap", self.swap, methods=["POST"]),
                Route("/events", self.events),
                Route("/metrics", self.prometheus),
                *worker_routes(self),
            ],
            exception_handlers=exception_handlers,  # a route raises; the answer is made here
        )
        # every state-changing request on this port is an admin verb, so all of them take JSON
        policy = HostPolicy(cfg.bind, cfg.allowed_hosts)
        self.app = ListenerGuard(self.routes, policy, json_only=True)

    def view(self) -> StatusView:
        """What this app shows, read now (one read per request)."""
        return read(self.broker, self.monitor, self.health)

    async def index(self, request: Request) -> Response:
        return JSONResponse(self.view().to_json())

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    def _authorise(self, request: Request) -> ClientError | None:
        """None when ``request`` may use admin verbs, else the error that says why not."""
        if self.open_admin:
            return None
        if self.token is None:
            return Forbidden(
                "admin verbs are off: the status port binds beyond "
                "loopback and no adminToken is set"
            )
        # the scheme is case-insensitive (RFC 9110 §11.1); the token is compared in constant time
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        matches = hmac.compare_digest(given.strip().encode("latin-1"), self.token.encode())
        if scheme.lower() != "bearer" or not matches:
            return Unauthorized("admin verbs need Authorization: Bearer <adminToken>")
        return None

    def admin(self, request: Request) -> None:
        """Raise the 401/403 unless ``request`` may use admin verbs."""
        if (denied := self._authorise(request)) is not None:
            raise denied

    def _backend(self, data: dict[str, Any], *, required: bool) -> str | None:
        name = data.get("backend")
        if name is None and not required:
            return None
        if not isinstance(name, str) or name not in self.broker.sched.slots:
            known = ", ".join(self.broker.sched.slots)
            raise UnknownBackend(f"no backend named {name!r} (known: {known})", backend=name)
        return name

    async def unload(self, request: Request) -> Response:
        self.admin(request)
        data = await json_object(request)
        name = self._backend(data, required=False)
        info = await self.broker.evict(name, force=bool(data.get("force", False)))
        if info is None:
            return JSONResponse({"ok": True, "unloaded": [], "message": "nothing to unload"})
        return JSONResponse(
            {
                "ok": not info.failures,
                "unloaded": list(info.evicted),
                "ms": round(info.total_s * 1000, 1),
                "failures": list(info.failures),
            }
        )

    async def swap(self, request: Request) -> Response:
        self.admin(request)
        name = self._backend(await json_object(request), required=True)
        assert name is not None  # required=True: a missing name is a 404 above
        grant = await self.broker.preload(name)  # or Refused
        swap = grant.swap
        return JSONResponse(
            {
                "ok": self.broker.sched.state(name) is State.RESIDENT,
                "owner": self.broker.sched.owner,
                "evicted": list(swap.evicted) if swap else [],
                "ms": round(grant.queued_s * 1000, 1),
            }
        )

    async def events(self, request: Request) -> Response:
        """Every event as SSE. ``?backend=`` keeps one backend's; ``?request=<id>`` follows
        one request from the queue to its first byte, with the swap that made room for it."""
        backend = request.query_params.get("backend")
        wanted = request.query_params.get("request")
        feed = EventFeed()
        swaps: set[int] = set()  # swaps started for the followed request

        def keep(event: dict[str, Any]) -> bool:
            if backend is not None and event.get("backend") != backend:
                return False
            if wanted is None:
                return True
            if event["event"] == "swap_started" and wanted in map(str, event["requests"]):
                swaps.add(event["swap"])
            return str(event.get("request")) == wanted or event.get("swap") in swaps

        async def stream() -> AsyncIterator[bytes]:
            self.broker.listeners.append(feed.push)
            try:
                yield b": connected\n\n"
                while True:
                    event = await feed.next(HEARTBEAT)
                    if feed.dropped:
                        lost = {"event": "dropped", "count": feed.dropped, "at": time.time()}
                        feed.dropped = 0
                        yield _sse(lost)
                    if event is None:
                        yield b": ping\n\n"
                    elif event["event"] == "shutting_down":
                        yield _sse(event)
                        return  # end the stream, so it does not hold up a graceful stop
                    elif keep(event):
                        yield _sse(event)
            finally:
                self.broker.listeners.remove(feed.push)
                feed.close()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['event']}\ndata: {json.dumps(event)}\n\n".encode()


class EventFeed:
    """One ``/events`` reader's buffer. The broker pushes without ever waiting: when the
    reader falls ``capacity`` events behind, newer events are dropped and counted, and the
    reader is told how many it lost once it catches up."""

    def __init__(self, capacity: int | None = None) -> None:
        size = EVENT_BUFFER if capacity is None else capacity
        self._send, self._receive = anyio.create_memory_object_stream[dict[str, Any]](size)
        self.dropped = 0

    def push(self, event: dict[str, Any]) -> None:
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def next(self, wait: float) -> dict[str, Any] | None:
        """The next event, or None after ``wait`` seconds without one."""
        with anyio.move_on_after(wait):
            return await self._receive.receive()
        return None

    def close(self) -> None:
        self._send.close()
        self._receive.close()
