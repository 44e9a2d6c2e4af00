"""The frozen views the read model is made of, one per section shown, in Python units.

:func:`gpubroker.observe.readmodel.read` builds them from the broker, its scheduler, the
monitor, the health results and the supervisor; every display reads them through its
:class:`~gpubroker.observe.readmodel.StatusView`. Times are wall-clock seconds, sizes bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gpubroker.observe.alerts import Alert
from gpubroker.observe.attribution import OwnedProcess
from gpubroker.observe.residency import UnitView
from gpubroker.scheduling.scheduler import State
from gpubroker.telemetry.base import GpuSample
from gpubroker.workers.supervisor import WorkerState


@dataclass(frozen=True, slots=True)
class LeaseView:
    """A GPU request holding or awaiting a lease. Times: wall-clock seconds."""

    id: int
    backend: str
    method: str
    path: str  # without the query
    since: float
    admitted_at: float | None
    caller: str | None = None  # who asked (a key's name, the client's own name, its address)
    model: str | None = None  # the model asked for, where known
    unit: str | None = None  # what it holds in the scheduler: the backend, or one of its models


@dataclass(frozen=True, slots=True)
class JobView:
    """A job in a service's own queue (ComfyUI); ``since`` None when nobody knows."""

    id: str
    backend: str
    state: Literal["running", "pending"]
    since: float | None
    method: str
    url: str


@dataclass(frozen=True, slots=True)
class QueueView:
    position: int  # from 1
    id: int
    backend: str
    unit: str  # the backend, or ``backend/model``
    waited_s: float


@dataclass(frozen=True, slots=True)
class SwapView:
    """One entry of the swap history, newest first in the view."""

    at: float
    to: str | None
    evicted: tuple[str, ...]
    drain_s: float
    unload_s: float
    load_s: float
    total_s: float
    failures: tuple[str, ...]
    reason: str = "request"  # request, admin, idle, unmanaged


@dataclass(frozen=True, slots=True)
class BackendView:
    """A backend; its state and counts are over all its units (:attr:`units`)."""

    name: str
    state: State  # the busiest of its units' states
    owner: bool  # OneGPU4All's single owner
    active: int  # leases held
    in_flight: int  # leases plus the service's own jobs
    job_count: int  # the service's own jobs, as the scheduler counts them
    jobs: tuple[JobView, ...] | None  # None: the service has no queue of its own
    queued: int
    upstream: str
    proxy_port: int
    strategy: str
    gpu_requests: int
    passthrough_requests: int
    refused: int
    upstream_errors: int
    health: Mapping[str, Any]  # the prober's last result ({"status": "unknown"} before it)
    gpus: tuple[str, ...]
    declared_vram: int | None
    measured_vram: int | None  # None: not traced, or a process would not say
    measured_by_gpu: Mapping[str, int | None]  # empty: not traced
    units: tuple[UnitView, ...] = ()  # every unit: its own first, then its models

    @property
    def up(self) -> bool | None:
        """What the health probe says (None: it says neither up nor down)."""
        status = self.health.get("status")
        return {"up": True, "down": False}.get(status) if isinstance(status, str) else None


@dataclass(frozen=True, slots=True)
class TelemetryView:
    source: str
    notice: str | None
    error: str | None
    taken_at: float
    interval_s: float


@dataclass(frozen=True, slots=True)
class GpuView:
    sample: GpuSample
    processes: tuple[OwnedProcess, ...]  # those on this GPU, with their owners


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A managed worker as the supervisor knows it, with what telemetry adds."""

    name: str
    state: WorkerState
    pid: int | None
    adopted: bool
    gpus: tuple[str, ...]
    upstream: str
    uptime_s: float | None  # while ready
    restarts: int
    last_exit: Mapping[str, Any] | None
    error: str | None
    log_tail: tuple[str, ...]  # admins only; kept once it failed
    command: tuple[str, ...]  # admins only
    vram: int | None  # what its processes hold, per telemetry
    warnings: tuple[Alert, ...]  # pinned to the wrong GPU
