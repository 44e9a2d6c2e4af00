"""The status + admin app on ``statusPort``: what the GPU is doing, and verbs for the CLI.

``GET /`` keeps OneGPU4All's field names (so its dashboards keep working) and adds ours: the
GPUs as telemetry sees them, each backend's measured VRAM next to its declared one, the queue
and the active warnings; a browser asking for it is sent to the dashboard at ``/ui/``
(``dashboard.py``). ``GET /metrics`` is the same in Prometheus' format and ``GET /events``
streams every scheduler event as Server-Sent Events.

``POST /api/reload`` re-reads the config file and applies it (``runtime/reload.py``).

Admin verbs (these, and the ``/api/workers`` verbs of ``worker_routes``) pass one gate
(``admin.py``): a bearer ``adminToken`` when one is set, refused outright when the port binds
beyond loopback without one; read-only routes stay open. In front
of every route, :class:`~gpubroker.observe.guard.ListenerGuard` keeps web pages out: only Host names
this port answers to (DNS rebinding), no foreign Origin on a verb, no CORS, JSON bodies only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpubroker.errors import BadRequest, UnknownBackend
from gpubroker.events import EventBus
from gpubroker.observe.admin import AdminGate
from gpubroker.observe.dashboard import VARY, Dashboard, to_ui, wants_html
from gpubroker.observe.guard import HostPolicy, ListenerGuard
from gpubroker.observe.health import HealthProbe
from gpubroker.observe.metrics import Metrics
from gpubroker.observe.monitor import Monitor
from gpubroker.observe.readmodel import StatusView, read
from gpubroker.observe.sse import EventStream
from gpubroker.observe.worker_routes import WorkersApi
from gpubroker.responses import exception_handlers, json_object
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.scheduler import State


class StatusApp:
    """Builds the Starlette app: status, metrics, the event stream and the admin verbs."""

    def __init__(
        self,
        broker: Broker,
        bus: EventBus,
        monitor: Monitor | None = None,
        health: HealthProbe | None = None,
        *,
        reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        """``reload``: re-reads the config file and applies it (``POST /api/reload``)."""
        self.broker = broker
        self._reload = reload
        self.monitor = monitor
        self.health: Mapping[str, Mapping[str, Any]] = health.results if health else {}
        self.metrics = Metrics(broker, bus, monitor, self.health)
        self.events = EventStream(bus)
        cfg = broker.config
        self.gate = AdminGate(cfg)
        workers = WorkersApi(broker, self.gate, self.view)
        self.routes = Starlette(
            routes=[
                Route("/", self.index),
                Route("/health", self.healthz),
                Route("/api/status", self.index),
                Route("/api/unload", self.unload, methods=["POST"]),
                Route("/api/swap", self.swap, methods=["POST"]),
                Route("/api/reload", self.reload, methods=["POST"]),
                Route("/events", self.events.endpoint),
                Route("/metrics", self.prometheus),
                *workers.routes(),
                *Dashboard().routes(),
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
        if request.url.path != "/":
            return JSONResponse(self.view().to_json())
        if wants_html(request):  # a browser: the dashboard
            return to_ui()
        return JSONResponse(self.view().to_json(), headers=VARY)

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    def _backend(self, data: dict[str, Any], *, required: bool) -> str | None:
        name = data.get("backend")
        if name is None and not required:
            return None
        if not isinstance(name, str) or name not in self.broker.sched.slots:
            known = ", ".join(self.broker.sched.slots)
            raise UnknownBackend(f"no backend named {name!r} (known: {known})", backend=name)
        return name

    async def unload(self, request: Request) -> Response:
        self.gate.check(request)
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
        self.gate.check(request)
        name = self._backend(await json_object(request), required=True)
        assert name is not None  # required=True: a missing name is a 404 above
        models = self.broker.sched.children.get(name)
        if name in self.broker.units.per_model:  # its own unit would take the whole card
            known = ", ".join(models or ()) or "none yet"
            raise BadRequest(f"{name} places its models one by one: swap to one of them ({known})")
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

    async def reload(self, request: Request) -> Response:
        """Re-read the config file and apply what changed (``gpubroker reload``): 200 with
        ``ok`` and what changed, or ``ok: false`` and the file's error (nothing changed)."""
        self.gate.check(request)
        await json_object(request)
        if self._reload is None:
            return JSONResponse({"ok": False, "error": "this broker cannot reload its config"})
        return JSONResponse(await self._reload())
