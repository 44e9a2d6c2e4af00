"""One read model: what the status page, ``/metrics`` and the workers list show.

:func:`read` looks at the broker, its scheduler, the monitor, the health results and the
supervisor once, and returns a frozen :class:`StatusView` in Python units (bytes, seconds,
enums). Every display reads that view and nothing else: ``GET /`` through
:meth:`StatusView.to_json` (the shape :mod:`gpubroker.observe.schema` declares), ``/metrics``
through its collector, ``GET /api/workers`` through :meth:`StatusView.workers_json`. So this is
the one module that knows where a displayed fact lives inside the broker.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

from gpubroker.observe.alerts import PINNED_TO_WRONG_GPU, Alert
from gpubroker.observe.attribution import OwnedProcess
from gpubroker.observe.monitor import Monitor
from gpubroker.observe.residency import GpuPlanView, listed, plan, plan_json, unit_json, units_of
from gpubroker.observe.schema import (
    BackendJson,
    GpuJson,
    HealthJson,
    LiveEntryJson,
    QueueEntryJson,
    StatusJson,
    SwapJson,
    TelemetryJson,
    WarningJson,
    WorkerJson,
)
from gpubroker.observe.views import (
    BackendView,
    GpuView,
    JobView,
    LeaseView,
    QueueView,
    SwapView,
    TelemetryView,
    WorkerView,
)
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.effects import SwapRecord
from gpubroker.scheduling.preload import PreloadStep
from gpubroker.workers.supervisor import Supervisor, WorkerState

Health = Mapping[str, Mapping[str, Any]]
UNKNOWN_HEALTH: Mapping[str, Any] = MappingProxyType({"status": "unknown"})


def iso(ts: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with a ``Z`` (None stays None)."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass(frozen=True, slots=True)
class StatusView:
    """Everything shown, at one moment ``now`` (wall-clock seconds)."""

    now: float
    started_at: float
    policy: str
    owner: str | None
    swap_count: int
    swapping: bool
    backends: tuple[BackendView, ...]  # in config order
    leases: tuple[LeaseView, ...]
    queue: tuple[QueueView, ...]
    swaps: tuple[SwapView, ...]
    telemetry: TelemetryView | None  # None: no monitor
    gpus: tuple[GpuView, ...]
    gpu_plan: tuple[GpuPlanView, ...]  # each GPU as the scheduler plans it
    processes: tuple[OwnedProcess, ...]  # every attributed GPU process
    warnings: tuple[Alert, ...]
    workers: tuple[WorkerView, ...]
    preload: tuple[PreloadStep, ...] = ()  # the start-up preload's progress

    @property
    def jobs(self) -> tuple[JobView, ...]:
        return tuple(j for b in self.backends for j in b.jobs or ())

    def to_json(self) -> StatusJson:
        """``GET /``: OneGPU4All's fields first, with its shapes and meanings.

        Tools written for it (its ``onegpu4all-status`` monitor reads
        ``Object.keys(activeRequests)``) keep working: ``activeRequests``, ``gpuRequests`` and
        ``passthroughRequests`` are keyed by backend, ``queuedBackends`` names one backend per
        waiter, ``uptime`` is whole seconds. Our totals are under ``totals``.
        """
        bs = self.backends
        return {
            "vramOwner": self.owner,
            "activeRequests": {b.name: b.in_flight for b in bs},
            "queueLength": len(self.queue),
            "queuedBackends": [q.backend for q in self.queue],
            "gpuRequests": {b.name: b.gpu_requests for b in bs},
            "passthroughRequests": {b.name: b.passthrough_requests for b in bs},
            "swapCount": self.swap_count,
            "lastSwapAt": iso(self.swaps[0].at) if self.swaps else None,
            "liveRequests": self._live_json(),
            "uptime": int(self.now - self.started_at),
            "totals": {
                "inFlight": sum(b.in_flight for b in bs),
                "leases": sum(b.active for b in bs),
                "jobs": sum(b.job_count for b in bs),
                "gpuRequests": sum(b.gpu_requests for b in bs),
                "passthroughRequests": sum(b.passthrough_requests for b in bs),
            },
            "policy": self.policy,
            "swapping": self.swapping,
            "backends": {b.name: _backend_json(b) for b in bs},
            "swaps": [_swap_json(s) for s in self.swaps],
            "queue": [_queue_json(q) for q in self.queue],
            "telemetry": self._telemetry_json(),
            "gpus": [_gpu_json(g) for g in self.gpus],
            "gpuPlan": [plan_json(p) for p in self.gpu_plan],
            "warnings": [_warning_json(a) for a in self.warnings],
            "preload": [
                {"target": p.target, "state": p.state, "error": p.error} for p in self.preload
            ],
        }

    def workers_json(self, *, admin: bool) -> list[WorkerJson]:
        """``GET /api/workers``' list; ``admin`` adds what may show secrets (logs, command)."""
        return [_worker_json(w, admin=admin) for w in self.workers]

    def _live_json(self) -> list[LiveEntryJson]:
        """Leases (queued or admitted), then the services' own jobs; ``kind`` tells them
        apart. OneGPU4All's live monitor prints ``method``, ``url``, ``startedAt``, ``backend``."""
        now = self.now
        out: list[LiveEntryJson] = [
            {
                "method": r.method,
                "url": r.path,  # without the query, as OneGPU4All shows it
                "startedAt": iso(r.since),
                "backend": r.backend,
                "unit": r.unit,
                "kind": "lease",
                "id": r.id,
                "path": r.path,
                "state": "active" if r.admitted_at else "queued",
                "elapsedMs": _ms(now - r.since),
                "queuedMs": _ms((r.admitted_at or now) - r.since),
                "caller": r.caller,
                "model": r.model,
            }
            for r in self.leases
        ]
        out += [
            {
                "method": j.method,
                "url": j.url,
                "startedAt": iso(j.since),
                "backend": j.backend,
                "unit": j.backend,  # a service's own jobs are its backend's own unit's
                "kind": "job",
                "id": j.id,
                "path": j.url,
                "state": j.state,  # running, or pending in the service's own queue
                "elapsedMs": None if j.since is None else _ms(now - j.since),
                "queuedMs": None,
                "caller": None,
                "model": None,
            }
            for j in self.jobs
        ]
        return out

    def _telemetry_json(self) -> TelemetryJson:
        t = self.telemetry
        if t is None:
            return {"source": None, "notice": "telemetry is not running", "error": None}
        return {
            "source": t.source,
            "notice": t.notice,
            "error": t.error,
            "takenAt": iso(t.taken_at),
            "intervalS": t.interval_s,
        }


def _backend_json(b: BackendView) -> BackendJson:
    health = cast(HealthJson, dict(b.health))  # the prober's own dict
    return {
        "state": b.state.value,
        "owner": b.owner,
        "active": b.active,
        "inFlight": b.in_flight,
        "jobs": None
        if b.jobs is None
        else [{"id": j.id, "state": j.state, "since": iso(j.since)} for j in b.jobs],
        "queued": b.queued,
        "upstream": b.upstream,
        "proxyPort": b.proxy_port,
        "strategy": b.strategy,
        "gpuRequests": b.gpu_requests,
        "passthroughRequests": b.passthrough_requests,
        "refused": b.refused,
        "upstreamErrors": b.upstream_errors,
        "health": health,
        "gpus": list(b.gpus),
        "declaredVram": b.declared_vram,
        "measuredVram": b.measured_vram,
        "measuredByGpu": dict(b.measured_by_gpu),
        "units": [unit_json(u) for u in listed(b.units)],
    }


def _swap_json(s: SwapView) -> SwapJson:
    return {
        "at": iso(s.at),
        "to": s.to,
        "evicted": list(s.evicted),
        "drainMs": round(s.drain_s * 1000, 1),
        "unloadMs": round(s.unload_s * 1000, 1),
        "loadMs": round(s.load_s * 1000, 1),
        "totalMs": round(s.total_s * 1000, 1),
        "failures": list(s.failures),
        "reason": s.reason,
    }


def _queue_json(q: QueueView) -> QueueEntryJson:
    return {
        "position": q.position,
        "id": q.id,
        "backend": q.backend,
        "unit": q.unit,
        "waitedMs": _ms(q.waited_s),
    }


def _gpu_json(view: GpuView) -> GpuJson:
    g = view.sample
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
            for p in view.processes
        ],
    }


def _warning_json(a: Alert) -> WarningJson:
    return {
        "code": a.code,
        "subject": a.subject,
        "backend": a.backend,
        "message": a.message,
        "since": iso(a.since),
        "sinceTs": a.since,
    }


def _worker_json(w: WorkerView, *, admin: bool) -> WorkerJson:
    secrets = {"logTail": list(w.log_tail), "command": list(w.command)} if admin else {}
    out = {
        "name": w.name,
        "state": w.state.value,
        "pid": w.pid,
        "adopted": w.adopted,
        "gpu": list(w.gpus),
        "upstream": w.upstream,
        "uptime": None if w.uptime_s is None else round(w.uptime_s, 1),
        "restarts": w.restarts,
        "lastExit": None if w.last_exit is None else dict(w.last_exit),
        "error": w.error,
        **secrets,
        "vram": w.vram,
        "warnings": [f"{a.code}: {a.message}" for a in w.warnings],
    }
    return cast(WorkerJson, out)


# --- reading the broker: the one place that knows where each shown fact lives -------------


def read(
    broker: Broker, monitor: Monitor | None = None, health: Health | None = None
) -> StatusView:
    """Look at everything once; the view is the same however many displays read it."""
    now = time.time()
    health = {} if health is None else health
    sched = broker.sched
    owner = sched.owner
    arrived = {r.lease: r.since for r in broker.live.values()}
    backends = []
    for b in broker.config.backends:
        counts = broker.counters[b.name]
        jobs = broker.jobs.get(b.name)
        measured = b.name in broker.measured
        units = units_of(sched, b.name)
        backends.append(
            BackendView(
                name=b.name,
                state=sched.backend_state(b.name),
                owner=owner == b.name,
                active=sum(u.active for u in units),
                in_flight=sum(sched.in_flight(u.name) for u in units),
                job_count=sum(sched.jobs_of(u.name) for u in units),
                jobs=None
                if jobs is None
                else tuple(JobView(j.id, b.name, j.state, j.since, j.method, j.url) for j in jobs),
                queued=sum(u.queued for u in units),
                upstream=b.upstream,
                proxy_port=b.proxy_port,
                strategy=b.unload_strategy,
                gpu_requests=counts["gpu"],
                passthrough_requests=counts["passthrough"],
                refused=counts["refused"],
                upstream_errors=counts["upstream_errors"],
                health=health.get(b.name, UNKNOWN_HEALTH),
                gpus=tuple(sched.slots[b.name].spec.gpus),
                declared_vram=b.vram,
                measured_vram=broker.measured_total(b.name) if measured else None,
                measured_by_gpu=dict(broker.measured.get(b.name, {})),
                units=units,
            )
        )
    alerts = tuple(monitor.alerts.current()) if monitor is not None else ()
    return StatusView(
        now=now,
        started_at=broker.started_at,
        policy=broker.config.policy,
        owner=owner,
        swap_count=sched.swap_count + broker.swaps_before,
        swapping=sched.swapping,
        backends=tuple(backends),
        leases=tuple(
            LeaseView(
                r.lease,
                r.backend,
                r.method,
                r.path,
                r.since,
                r.admitted_at,
                r.caller,
                r.model,
                r.unit or r.backend,
            )
            for r in broker.live.values()
        ),
        queue=tuple(
            QueueView(
                i,
                w.lease,
                sched.slots[w.backend].spec.backend,  # a waiter's backend is its unit
                w.backend,
                now - arrived.get(w.lease, now),
            )
            for i, w in enumerate(sched.queue, 1)
        ),
        swaps=tuple(_swap(s) for s in broker.history),
        telemetry=_telemetry(monitor),
        gpus=_gpus(monitor),
        gpu_plan=plan(sched, {str(g.index) for g in monitor.snapshot.gpus} if monitor else ()),
        processes=tuple(monitor.attribution.processes) if monitor is not None else (),
        warnings=alerts,
        workers=_workers(broker, broker.supervisor, alerts, now),
        preload=tuple(PreloadStep(p.target, p.state, p.error) for p in broker.preloads),
    )


def _swap(record: SwapRecord) -> SwapView:
    info = record.info
    return SwapView(
        at=record.at,
        to=info.target,
        evicted=info.evicted,
        drain_s=info.drain_s,
        unload_s=info.unload_s,
        load_s=info.load_s,
        total_s=info.total_s,
        failures=info.failures,
        reason=info.reason,
    )


def _telemetry(monitor: Monitor | None) -> TelemetryView | None:
    if monitor is None:
        return None
    snap = monitor.snapshot
    return TelemetryView(
        monitor.sampler.source.name, snap.notice, snap.error, snap.taken_at, monitor.interval
    )


def _gpus(monitor: Monitor | None) -> tuple[GpuView, ...]:
    if monitor is None:
        return ()
    procs = monitor.attribution.processes
    return tuple(
        GpuView(g, tuple(p for p in procs if p.gpu == str(g.index))) for g in monitor.snapshot.gpus
    )


def _workers(
    broker: Broker, sup: Supervisor | None, alerts: tuple[Alert, ...], now: float
) -> tuple[WorkerView, ...]:
    """Each worker with the VRAM it holds and its pinning warning, both from the monitor
    (one reading of the GPUs, one rule)."""
    if sup is None:
        return ()
    out = []
    for w in sup.workers.values():
        measured = w.pid is not None and w.name in broker.measured
        ready = w.state is WorkerState.READY
        out.append(
            WorkerView(
                name=w.name,
                state=w.state,
                pid=w.pid,
                adopted=w.adopted,
                gpus=tuple(w.gpu_ids) or tuple(str(g) for g in (w.spec.gpu or (0,))),
                upstream=w.spec.upstream,
                uptime_s=now - w.started_at if w.started_at and ready else None,
                restarts=w.restarts,
                last_exit=None if w.last_exit is None else dict(w.last_exit),
                error=w.error,
                log_tail=tuple(w.log.tail()) if w.state is WorkerState.FAILED else (),
                command=tuple(w.argv or w.spec.command or ()),
                vram=broker.measured_total(w.name) if measured else None,
                warnings=tuple(
                    a for a in alerts if a.backend == w.name and a.code == PINNED_TO_WRONG_GPU
                ),
            )
        )
    return tuple(out)
