"""The status + admin app on ``statusPort``: what the GPU is doing, and verbs for the CLI.

``GET /`` keeps OneGPU4All's field names (so its dashboards keep working) and adds ours.
Admin verbs need ``Authorization: Bearer <adminToken>`` when a token is set, and are refused
outright when the port binds beyond loopback without one; read-only routes stay open.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .broker import Broker, Refused
from .scheduler import State, SwapInProgress

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def snapshot(broker: Broker, health: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything ``GET /`` shows, as plain JSON-able data."""
    sched = broker.sched
    now = time.time()
    queued_backends = list(dict.fromkeys(w.backend for w in sched.queue))
    live = [
        {
            "id": r.lease,
            "backend": r.backend,
            "path": r.path,
            "state": "active" if r.admitted_at else "queued",
            "elapsedMs": round((now - r.since) * 1000),
        }
        for r in broker.live.values()
    ]
    last_swap = broker.history[0]["at"] if broker.history else None
    backends = {}
    for b in broker.config.backends:
        counts = broker.counters[b.name]
        backends[b.name] = {
            "state": sched.state(b.name).value,
            "owner": sched.owner == b.name,
            "active": sched.active(b.name),
            "queued": sched.queued(b.name),
            "upstream": b.upstream,
            "proxyPort": b.proxy_port,
            "strategy": b.unload_strategy,
            "gpuRequests": counts["gpu"],
            "passthroughRequests": counts["passthrough"],
            "refused": counts["refused"],
            "upstreamErrors": counts["upstream_errors"],
            "health": (health or {}).get(b.name, {"status": "unknown"}),
        }
    return {
        "vramOwner": sched.owner,
        "activeRequests": sum(sched.active(b.name) for b in broker.config.backends),
        "queueLength": len(sched.queue),
        "queuedBackends": queued_backends,
        "gpuRequests": sum(c["gpu"] for c in broker.counters.values()),
        "passthroughRequests": sum(c["passthrough"] for c in broker.counters.values()),
        "swapCount": sched.swap_count,
        "lastSwapAt": _iso(last_swap),
        "liveRequests": live,
        "uptime": round(now - broker.started_at, 1),
        "policy": broker.config.policy,
        "swapping": sched.swap is not None,
        "backends": backends,
        "swaps": [dict(s, at=_iso(s["at"])) for s in broker.history],
    }


def _error(status: int, code: str, message: str, backend: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": code, "message": message, "backend": backend, "retryable": status >= 500},
        status_code=status,
    )


class StatusApp:
    """Builds the Starlette app; ``health`` is filled in by the server's prober."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.health: dict[str, dict[str, Any]] = {}
        cfg = broker.config
        self.token = cfg.admin_token
        self.open_admin = self.token is None and cfg.bind in LOOPBACK
        self.app = Starlette(
            routes=[
                Route("/", self.index),
                Route("/health", self.healthz),
                Route("/api/status", self.index),
                Route("/api/unload", self.unload, methods=["POST"]),
                Route("/api/swap", self.swap, methods=["POST"]),
                Route("/events", self.events),
            ]
        )

    async def index(self, request: Request) -> Response:
        return JSONResponse(snapshot(self.broker, self.health))

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    def _authorise(self, request: Request) -> Response | None:
        if self.open_admin:
            return None
        if self.token is None:
            return _error(
                403,
                "forbidden",
                "admin verbs are off: the status port binds beyond "
                "loopback and no adminToken is set",
            )
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return _error(
                401, "unauthorized", "admin verbs need Authorization: Bearer <adminToken>"
            )
        return None

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            return _error(400, "bad_request", "the body must be JSON")
        if not isinstance(data, dict):
            return _error(400, "bad_request", "the body must be a JSON object")
        return data

    def _backend(self, data: dict[str, Any], *, required: bool) -> str | Response | None:
        name = data.get("backend")
        if name is None and not required:
            return None
        if not isinstance(name, str) or name not in self.broker.sched.slots:
            known = ", ".join(self.broker.sched.slots)
            return _error(
                404, "unknown_backend", f"no backend named {name!r} (known: {known})", name
            )
        return name

    async def unload(self, request: Request) -> Response:
        if (denied := self._authorise(request)) is not None:
            return denied
        data = await self._body(request)
        if isinstance(data, Response):
            return data
        name = self._backend(data, required=False)
        if isinstance(name, Response):
            return name
        force = bool(data.get("force", False))
        try:
            info = await self.broker.evict(name, force=force)
        except SwapInProgress as exc:
            return _error(409, "swap_in_progress", str(exc), name)
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
        if (denied := self._authorise(request)) is not None:
            return denied
        data = await self._body(request)
        if isinstance(data, Response):
            return data
        name = self._backend(data, required=True)
        if isinstance(name, Response):
            return name

        try:
            grant = await self.broker.preload(name)
        except Refused as exc:
            r = exc.refusal
            return _error(r.status, r.code, r.message, name)
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
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](256)

        def listener(event: dict[str, Any]) -> None:
            try:
                send.send_nowait(event)
            except anyio.WouldBlock:
                pass  # a slow reader loses events rather than slowing the broker

        async def stream() -> AsyncIterator[bytes]:
            self.broker.listeners.append(listener)
            try:
                yield b": connected\n\n"
                async with receive:
                    async for event in receive:
                        yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n".encode()
            finally:
                self.broker.listeners.remove(listener)
                send.close()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )
