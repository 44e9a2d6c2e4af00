"""``GET /metrics``: the broker and its GPUs in Prometheus' text format (prometheus-client).

Each broker has a registry of its own, never the process-global one, so tests and embedded
brokers never collide. Gauges and counts the broker already keeps are read at scrape time, from
one :mod:`~gpubroker.observe.readmodel` view; only what the broker does not keep (the queue wait,
swap phases and first byte as distributions, evictions with why they happened) is observed as
events happen. A reading telemetry cannot give is left out, never exported as zero.

Counters continue across a restart: the broker's own (requests, refusals, upstream errors,
swaps) through its part of the state file (``scheduling/memory.py``), and those kept only here
(:data:`KEPT`: evictions, unload failures, OOMs avoided, api requests) through the ``metrics``
section, saved whenever the state file is (the broker's counters move with them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpubroker.events import (
    Admitted,
    Event,
    EventBus,
    FirstByte,
    Freed,
    LeaseRefused,
    SwapAbandoned,
    SwapFailed,
    SwapLoadFailed,
    Swapped,
    SwapStarted,
    UnloadFailed,
)
from gpubroker.observe.alerts import ALERT_CODES
from gpubroker.observe.monitor import Monitor
from gpubroker.observe.readmodel import StatusView, read
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.scheduler import State

WAIT_BUCKETS = (0.005, 0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300)
SWAP_BUCKETS = (0.05, 0.25, 1, 2.5, 5, 10, 30, 60, 120, 300)
PHASES = ("drain", "unload", "load", "total")
REASONS = ("request", "admin", "idle", "unmanaged")  # why a plan frees units (SwapStarted)
OPEN_SWAPS = 256  # reasons kept for swaps in progress; beyond, the oldest is forgotten

# (metric suffix, help, GpuSample attribute, scale)
_GPU_GAUGES = (
    ("memory_total_bytes", "GPU memory in total", "memory_total", 1),
    ("memory_used_bytes", "GPU memory in use", "memory_used", 1),
    ("memory_free_bytes", "GPU memory free", "memory_free", 1),
    ("utilization_ratio", "GPU busy time over the last sample period (0-1)", "utilization", 0.01),
    ("power_watts", "GPU power draw", "power_draw", 1),
    ("power_limit_watts", "GPU enforced power limit", "power_limit", 1),
    ("temperature_celsius", "GPU core temperature", "temperature", 1),
    ("fan_ratio", "GPU fan speed (0-1 of maximum)", "fan", 0.01),
    ("sm_clock_hertz", "GPU SM clock", "sm_clock", 1e6),
    ("memory_clock_hertz", "GPU memory clock", "mem_clock", 1e6),
)


class _StateCollector(Collector):
    """Reads one view of the broker, its GPUs and its warnings at scrape time."""

    def __init__(self, view: Callable[[], StatusView]) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        view = self.view()
        yield from _gpus(view)
        yield from _backends(view)
        yield from _units(view)
        queue = GaugeMetricFamily("gpubroker_queue_length", "Requests waiting for the GPU")
        queue.add_metric([], len(view.queue))
        yield queue
        swaps = CounterMetricFamily("gpubroker_swaps", "Swaps that evicted something")
        swaps.add_metric([], view.swap_count)
        yield swaps
        alerts = GaugeMetricFamily("gpubroker_warnings", "Active warnings by code", labels=["code"])
        for code in ALERT_CODES:
            alerts.add_metric([code], sum(1 for a in view.warnings if a.code == code))
        yield alerts


def _gpus(view: StatusView) -> Iterator[Metric]:
    if view.telemetry is None:
        return
    up = GaugeMetricFamily("gpubroker_telemetry_up", "1 when the last GPU reading succeeded")
    up.add_metric([], 0 if view.telemetry.error else 1)
    yield up
    labels = ["gpu", "uuid", "name"]
    for suffix, text, attr, scale in _GPU_GAUGES:
        family = GaugeMetricFamily(f"gpubroker_gpu_{suffix}", text, labels=labels)
        for g in (gpu.sample for gpu in view.gpus):
            value = getattr(g, attr)
            if value is not None:
                family.add_metric([str(g.index), g.uuid, g.name], value * scale)
        yield family
    procs = GaugeMetricFamily(
        "gpubroker_gpu_process_memory_bytes",
        "GPU memory per process, with the backend that owns it (empty: none)",
        labels=["gpu", "pid", "owner"],
    )
    for p in view.processes:
        if p.used is not None:
            procs.add_metric([p.gpu, str(p.pid), p.owner or ""], p.used)
    yield procs


def _backends(view: StatusView) -> Iterator[Metric]:
    by_kind = CounterMetricFamily(
        "gpubroker_requests",
        "Requests per backend: kind=gpu took a lease, kind=passthrough did not",
        labels=["backend", "kind"],
    )
    refused = CounterMetricFamily(
        "gpubroker_refusals", "Requests the scheduler refused (503, 507…)", labels=["backend"]
    )
    errors = CounterMetricFamily(
        "gpubroker_upstream_errors", "Upstream failures seen by the proxy", labels=["backend"]
    )
    active = GaugeMetricFamily("gpubroker_active_requests", "GPU leases held", labels=["backend"])
    jobs = GaugeMetricFamily(
        "gpubroker_service_jobs",
        "Jobs in the service's own queue (ComfyUI), running or pending: in flight too",
        labels=["backend"],
    )
    queued = GaugeMetricFamily("gpubroker_queued_requests", "Requests waiting", labels=["backend"])
    state = GaugeMetricFamily(
        "gpubroker_backend_state",
        "1 for the backend's scheduler state",
        labels=["backend", "state"],
    )
    up = GaugeMetricFamily(
        "gpubroker_backend_up", "1 when the health probe passes", labels=["backend"]
    )
    declared = GaugeMetricFamily(
        "gpubroker_backend_vram_declared_bytes", "The config's vram", labels=["backend"]
    )
    measured = GaugeMetricFamily(
        "gpubroker_backend_vram_measured_bytes",
        "VRAM the backend's processes hold, per telemetry",
        labels=["backend"],
    )
    for b in view.backends:
        by_kind.add_metric([b.name, "gpu"], b.gpu_requests)
        by_kind.add_metric([b.name, "passthrough"], b.passthrough_requests)
        refused.add_metric([b.name], b.refused)
        errors.add_metric([b.name], b.upstream_errors)
        active.add_metric([b.name], b.active)
        if b.jobs is not None:
            jobs.add_metric([b.name], b.job_count)
        queued.add_metric([b.name], b.queued)
        for s in State:
            state.add_metric([b.name, s.value], 1 if s is b.state else 0)
        if b.up is not None:
            up.add_metric([b.name], 1 if b.up else 0)
        if b.declared_vram is not None:
            declared.add_metric([b.name], b.declared_vram)
        if b.measured_vram is not None:
            measured.add_metric([b.name], b.measured_vram)
    yield from (by_kind, refused, errors, active, jobs, queued, state, up, declared, measured)


def _units(view: StatusView) -> Iterator[Metric]:
    """Each unit (a backend's own: model empty), and the memory nobody owns on each GPU."""
    vram = GaugeMetricFamily(
        "gpubroker_unit_vram_bytes",
        "What each unit holding memory is planned to take, over its GPUs, and where that figure "
        "comes from (declared, learned, estimated, measured, unknown, exclusive)",
        labels=["backend", "model", "source"],
    )
    state = GaugeMetricFamily(
        "gpubroker_unit_state",
        "1 for each unit's scheduler state (model empty: the backend's own unit)",
        labels=["backend", "model", "state"],
    )
    for u in (u for b in view.backends for u in b.units):
        model = u.model or ""
        for s in State:
            state.add_metric([u.backend, model, s.value], 1 if s is u.state else 0)
        if u.holds and u.vram is not None:
            vram.add_metric([u.backend, model, u.source], u.vram)
    unmanaged = GaugeMetricFamily(
        "gpubroker_unmanaged_vram_bytes",
        "GPU memory held by processes no backend owns, which the budget scheduler takes off "
        "the GPU's capacity",
        labels=["gpu"],
    )
    capacity = GaugeMetricFamily(
        "gpubroker_gpu_capacity_bytes",
        "What the scheduler may plan with on each GPU (declared or total memory, less reserve)",
        labels=["gpu"],
    )
    planned = GaugeMetricFamily(
        "gpubroker_gpu_planned_bytes",
        "What the scheduler plans as taken on each GPU: units holding memory, and what nobody owns",
        labels=["gpu"],
    )
    for p in view.gpu_plan:
        if p.unmanaged is not None:
            unmanaged.add_metric([p.gpu], p.unmanaged)
        if p.capacity is not None:
            capacity.add_metric([p.gpu], p.capacity)
        if p.planned is not None:
            planned.add_metric([p.gpu], p.planned)
    yield from (vram, state, unmanaged, capacity, planned)


KEPT = ("evictions", "unload_failures", "oom_avoided", "api_requests")  # kept across restarts


class Metrics:
    """The registry for one broker, fed by its events."""

    def __init__(
        self,
        broker: Broker,
        bus: EventBus,
        monitor: Monitor | None = None,
        health: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        names = [b.name for b in broker.config.backends]
        self.queue_wait = Histogram(
            "gpubroker_queue_wait_seconds",
            "Time from arrival to admission of GPU requests",
            ["backend"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "gpubroker_first_byte_seconds",
            "Time from arrival to the first response body byte of GPU requests",
            ["backend"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.swap_duration = Histogram(
            "gpubroker_swap_duration_seconds",
            "Swap time by phase (drain: in-flight work ends; unload; load)",
            ["phase"],
            buckets=SWAP_BUCKETS,
            registry=self.registry,
        )
        self.unload_failures = Counter(
            "gpubroker_unload_failures",
            "Unloads that failed or timed out",
            ["backend"],
            registry=self.registry,
        )
        self.oom_avoided = Counter(
            "gpubroker_oom_avoided",
            "Requests refused with 507 because they could never fit (an OOM avoided)",
            ["backend"],
            registry=self.registry,
        )
        self.api_requests = Counter(
            "gpubroker_api_requests",
            "GPU requests admitted, by backend, model (where the api port knows it, else empty) "
            "and caller (an API key's name, else other)",
            ["backend", "model", "caller"],
            registry=self.registry,
        )
        self.evictions = Counter(
            "gpubroker_evictions",
            "Units freed by a swap, by why: request (room for a request), admin (an unload or "
            "swap asked for), idle (idleTimeout), unmanaged (memory no backend owns grew)",
            ["backend", "model", "reason"],
            registry=self.registry,
        )
        self._reasons: dict[int, str] = {}  # swap id -> why, while it runs
        self._labelled: dict[tuple[Histogram | Counter, tuple[str | None, ...]], Any] = {}
        self._key_names = frozenset(k.name for k in broker.config.api_keys)
        for name in names:  # every series exists from the start, at zero
            self.queue_wait.labels(name)
            self.first_byte.labels(name)
            self.unload_failures.labels(name)
            self.oom_avoided.labels(name)
        for phase in PHASES:
            self.swap_duration.labels(phase)
        for unit in broker.sched.slots.values():
            for reason in REASONS:
                self.evictions.labels(unit.spec.backend, unit.spec.model or "", reason)
        self._section = broker.state.section("metrics") if broker.state is not None else None
        if self._section is not None:
            self._restore(self._section.loaded, set(names))
            self._section.provide(self._kept)
        state = {} if health is None else health
        self.registry.register(_StateCollector(lambda: read(broker, monitor, state)))
        kinds = (Admitted, FirstByte, LeaseRefused, SwapStarted, Freed, UnloadFailed, Swapped)
        bus.subscribe(self.on_event, (*kinds, SwapFailed, SwapAbandoned, SwapLoadFailed))

    def on_event(self, event: Event) -> None:
        match event:
            case Admitted():
                self._series(self.queue_wait, event.backend).observe(event.queued)
                if event.caller is not None:  # a request's (the broker's own swaps have none)
                    self._count_request(event)
            case FirstByte(elapsed=float() as elapsed):
                self._series(self.first_byte, event.backend).observe(elapsed)
            case Swapped():
                phases = zip(
                    PHASES, (event.drain, event.unload, event.load, event.total), strict=True
                )
                for phase, seconds in phases:
                    self.swap_duration.labels(phase).observe(seconds)
                self._reasons.pop(event.swap, None)
            case UnloadFailed():
                self.unload_failures.labels(event.backend).inc()
                if not event.holding:  # it failed, yet its memory is gone: it went all the same
                    self._evicted(event.backend, event.model, event.swap)
            case LeaseRefused(status=507):
                self.oom_avoided.labels(event.backend).inc()
            case SwapStarted():
                self._reasons[event.swap] = event.reason
                while len(self._reasons) > OPEN_SWAPS:
                    del self._reasons[next(iter(self._reasons))]
            case Freed():
                self._evicted(event.backend, event.model, event.swap)
            case SwapFailed() | SwapAbandoned() | SwapLoadFailed():  # ends without "swapped"
                self._reasons.pop(event.swap, None)

    def _series(self, metric: Histogram | Counter, *labels: str | None) -> Any:
        """``metric.labels(*labels)``, kept: each GPU request asks for the same few series,
        and prometheus_client's lookup validates and takes a lock every time."""
        key = (metric, labels)
        series = self._labelled.get(key)
        if series is None:
            series = self._labelled[key] = metric.labels(*labels)
        return series

    def _evicted(self, backend: str | None, model: str | None, swap: int) -> None:
        """A unit a swap freed: counted once, when its memory went (a swap whose target then
        fails to load evicted its victims all the same), with the reason its swap began for."""
        reason = self._reasons.get(swap, "unknown")
        self.evictions.labels(backend or "", model or "", reason).inc()

    def _count_request(self, event: Admitted) -> None:
        """Labels only of bounded sets: a configured key's name (never an address or what a
        client calls itself), and the model only where the lease names it."""
        # A key's name only for a request the api port let in with that key: those, and only
        # those, carry the catalogue's model. Elsewhere the name is the client's own say-so
        # (X-GPUBroker-Client on a proxy port), which must not pass for a key.
        keyed = event.model is not None and event.caller in self._key_names
        caller = event.caller if keyed else "other"
        self._series(self.api_requests, event.backend, event.model or "", caller).inc()

    def _counters(self) -> dict[str, Counter]:
        return {name: getattr(self, name) for name in KEPT}

    def _kept(self) -> dict[str, list[dict[str, Any]]]:
        """Every labelled value of the kept counters, for the state file."""
        out: dict[str, list[dict[str, Any]]] = {}
        for name, counter in self._counters().items():
            rows = out[name] = []
            for metric in counter.collect():
                for sample in metric.samples:
                    if sample.name.endswith("_total") and sample.value > 0:
                        rows.append({"labels": dict(sample.labels), "value": sample.value})
        return out

    def _restore(self, loaded: Any, backends: set[str]) -> None:
        """What an earlier run counted, added back, for the backends configured now (a
        malformed row is skipped)."""
        if not isinstance(loaded, dict):
            return
        for name, counter in self._counters().items():
            rows = loaded.get(name)
            for row in rows if isinstance(rows, list) else []:
                try:
                    labels, value = row["labels"], float(row["value"])
                    if labels.get("backend") not in backends:
                        continue
                    if value > 0 and value != float("inf"):
                        counter.labels(**{k: str(v) for k, v in labels.items()}).inc(value)
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue

    def render(self) -> bytes:
        return generate_latest(self.registry)
