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

import datetime as dt
import hmac
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpubroker.events import EventBus
from gpubroker.observe.guard import HostPolicy, ListenerGuard, is_loopback
from gpubroker.observe.health import HealthProbe
from gpubroker.observe.metrics import Metrics
from gpubroker.observe.monitor import Monitor
from gpubroker.observe.sse import EventStream
from gpubroker.observe.telemetry.base import GpuSample
from gpubroker.responses import error_response, json_object
from gpubroker.scheduling.broker import Broker, Refused
from gpubroker.scheduling.scheduler import State, SwapInProgress
from gpubroker.workers.routes import worker_routes


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def _gpu(g: GpuSample, monitor: Monitor) -> dict[str, Any]:
    key = str(g.index)
    return {
        "index": g.index,
        "uuid": g.uuid,
        "name": g.name,
        "memoryTotal": g.memory_total,
        "memoryUsed": g.memory_used,
        "memoryFree": g.memory_free,
        "utilization": g.utilization,
        "powerDraw": g.power_draw,
        "powerLimit": g.power_limit,
        "temperature": g.temperature,
        "fan": g.fan,
        "smClock": g.sm_clock,
        "memClock": g.mem_clock,
        "processes": [
            {
                "pid": p.pid,
                "name": p.name,
                "usedBytes": p.used,
                "owner": p.owner,
                "visible": p.visible,
            }
            for p in monitor.attribution.processes
            if p.gpu == key
        ],
    }


def _telemetry(monitor: Monitor | None) -> dict[str, Any]:
    if monitor is None:
        return {"source": None, "notice": "telemetry is not running", "error": None}
    snap = monitor.snapshot
    return {
        "source": monitor.sampler.source.name,
        "notice": snap.notice,
        "error": snap.error,
        "takenAt": _iso(snap.taken_at),
        "intervalS": monitor.interval,
    }


def _live(broker: Broker, now: float) -> list[dict[str, Any]]:
    """Leases (queued or admitted), then the services' own jobs.

    Each entry has OneGPU4All's ``method``, ``url``, ``startedAt`` and ``backend`` (its live
    monitor prints them) and our own fields beside them; ``kind`` tells a lease from a job.
    """
    out: list[dict[str, Any]] = [
        {
            "method": r.method,
            "url": r.path,  # without the query, as OneGPU4All shows it
            "startedAt": _iso(r.since),
            "backend": r.backend,
            "kind": "lease",
            "id": r.lease,
            "path": r.path,
            "state": "active" if r.admitted_at else "queued",
            "elapsedMs": round((now - r.since) * 1000),
            "queuedMs": round(((r.admitted_at or now) - r.since) * 1000),
        }
        for r in broker.live.values()
    ]
    for backend, jobs in broker.jobs.items():
        for job in jobs:
            out.append(
                {
                    "method": job.method,
                    "url": job.url,
                    "startedAt": _iso(job.since),
                    "backend": backend,
                    "kind": "job",
                    "id": job.id,
                    "path": job.url,
                    "state": job.state,  # running, or pending in the service's own queue
                    "elapsedMs": None if job.since is None else round((now - job.since) * 1000),
                    "queuedMs": None,
                }
            )
    return out


def snapshot(
    broker: Broker,
    health: dict[str, dict[str, Any]] | None = None,
    monitor: Monitor | None = None,
) -> dict[str, Any]:
    """Everything ``GET /`` shows, as plain JSON-able data.

    The first fields are OneGPU4All's, with its shapes and meanings, so tools written for it
    (its ``onegpu4all-status`` monitor reads ``Object.keys(activeRequests)``) keep working:
    ``activeRequests``, ``gpuRequests`` and ``passthroughRequests`` are keyed by backend,
    ``queuedBackends`` names one backend per waiter, ``uptime`` is whole seconds. Our totals
    are under ``totals``.
    """
    sched = broker.sched
    now = time.time()
    names = [b.name for b in broker.config.backends]
    arrived = {r.lease: r.since for r in broker.live.values()}
    queue = [
        {
            "position": i,
            "id": w.lease,
            "backend": w.backend,
            "waitedMs": round((now - arrived.get(w.lease, now)) * 1000),
        }
        for i, w in enumerate(sched.queue, 1)
    ]
    last_swap = broker.history[0]["at"] if broker.history else None
    backends = {}
    for b in broker.config.backends:
        counts = broker.counters[b.name]
        jobs = broker.jobs.get(b.name)
        backends[b.name] = {
            "state": sched.state(b.name).value,
            "owner": sched.owner == b.name,
            "active": sched.active(b.name),
            "inFlight": sched.in_flight(b.name),
            "jobs": None
            if jobs is None
            else [{"id": j.id, "state": j.state, "since": _iso(j.since)} for j in jobs],
            "queued": sched.queued(b.name),
            "upstream": b.upstream,
            "proxyPort": b.proxy_port,
            "strategy": b.unload_strategy,
            "gpuRequests": counts["gpu"],
            "passthroughRequests": counts["passthrough"],
            "refused": counts["refused"],
            "upstreamErrors": counts["upstream_errors"],
            "health": (health or {}).get(b.name, {"status": "unknown"}),
            "gpus": list(sched.slots[b.name].spec.gpus),
            "declaredVram": b.vram,
            "measuredVram": broker.measured_total(b.name) if b.name in broker.measured else None,
            "measuredByGpu": broker.measured.get(b.name, {}),
        }
    return {
        "vramOwner": sched.owner,
        "activeRequests": {n: sched.in_flight(n) for n in names},
        "queueLength": len(sched.queue),
        "queuedBackends": [w.backend for w in sched.queue],
        "gpuRequests": {n: broker.counters[n]["gpu"] for n in names},
        "passthroughRequests": {n: broker.counters[n]["passthrough"] for n in names},
        "swapCount": sched.swap_count,
        "lastSwapAt": _iso(last_swap),
        "liveRequests": _live(broker, now),
        "uptime": int(now - broker.started_at),
        "totals": {
            "inFlight": sum(sched.in_flight(n) for n in names),
            "leases": sum(sched.active(n) for n in names),
            "jobs": sum(sched.jobs_of(n) for n in names),
            "gpuRequests": sum(c["gpu"] for c in broker.counters.values()),
            "passthroughRequests": sum(c["passthrough"] for c in broker.counters.values()),
        },
        "policy": broker.config.policy,
        "swapping": sched.swapping,
        "backends": backends,
        "swaps": [dict(s, at=_iso(s["at"])) for s in broker.history],
        "queue": queue,
        "telemetry": _telemetry(monitor),
        "gpus": [_gpu(g, monitor) for g in monitor.snapshot.gpus] if monitor else [],
        "warnings": [
            dict(a.to_json(), since=_iso(a.since), sinceTs=a.since)
            for a in (monitor.alerts.current() if monitor else [])
        ],
    }


class StatusApp:
    """Builds the Starlette app: status, metrics, the event stream and the admin verbs."""

    def __init__(
        self,
        broker: Broker,
        bus: EventBus,
        monitor: Monitor | None = None,
        health: HealthProbe | None = None,
    ) -> None:
        self.broker = broker
        self.monitor = monitor
        self.health: Mapping[str, Mapping[str, Any]] = health.results if health else {}
        self.metrics = Metrics(broker, bus, monitor, self.health)
        self.events = EventStream(bus)
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
                Route("/events", self.events.endpoint),
                Route("/metrics", self.prometheus),
                *worker_routes(self),
            ]
        )
        # every state-changing request on this port is an admin verb, so all of them take JSON
        policy = HostPolicy(cfg.bind, cfg.allowed_hosts)
        self.app = ListenerGuard(self.routes, policy, json_only=True)

    async def index(self, request: Request) -> Response:
        health = {name: dict(h) for name, h in self.health.items()}  # as of now
        return JSONResponse(snapshot(self.broker, health, self.monitor))

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    def _authorise(self, request: Request) -> Response | None:
        if self.open_admin:
            return None
        if self.token is None:
            return error_response(
                403,
                "forbidden",
                "admin verbs are off: the status port binds beyond "
                "loopback and no adminToken is set",
            )
        # the scheme is case-insensitive (RFC 9110 §11.1); the token is compared in constant time
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        matches = hmac.compare_digest(given.strip().encode("latin-1"), self.token.encode())
        if scheme.lower() != "bearer" or not matches:
            return error_response(
                401, "unauthorized", "admin verbs need Authorization: Bearer <adminToken>"
            )
        return None

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        return await json_object(request)

    def _backend(self, data: dict[str, Any], *, required: bool) -> str | Response | None:
        name = data.get("backend")
        if name is None and not required:
            return None
        if not isinstance(name, str) or name not in self.broker.sched.slots:
            known = ", ".join(self.broker.sched.slots)
            return error_response(
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
            return error_response(409, "swap_in_progress", str(exc), name)
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
        assert name is not None  # required=True: a missing name is a 404 above

        try:
            grant = await self.broker.preload(name)
        except Refused as exc:
            r = exc.refusal
            return error_response(r.status, r.code, r.message, name)
        swap = grant.swap
        return JSONResponse(
            {
                "ok": self.broker.sched.state(name) is State.RESIDENT,
                "owner": self.broker.sched.owner,
                "evicted": list(swap.evicted) if swap else [],
                "ms": round(grant.queued_s * 1000, 1),
            }
        )
