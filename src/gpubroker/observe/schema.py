"""The status JSON (``GET /``, ``/api/status``) and the workers list, declared once.

:meth:`gpubroker.observe.readmodel.StatusView.to_json` produces these shapes and
``gpubroker status`` reads them (:mod:`gpubroker.cli.watch`), both checked by mypy; a test
keeps the JSON to exactly the declared keys. Field names are the wire's (camelCase),
OneGPU4All's first. Sizes are bytes, times ISO 8601 strings (``...Z``) or milliseconds as
their names say.
"""

# No `from __future__ import annotations`: evaluated annotations let `__required_keys__`
# honour NotRequired on Python 3.11, which the test of the JSON's shape relies on.
from typing import Any, Literal, NotRequired, TypedDict


class HealthJson(TypedDict):
    """The health prober's last word on a backend (``status`` "unknown" before it spoke)."""

    status: str  # up, down, unknown, or a managed worker's state (stopped, starting…)
    latencyMs: NotRequired[float]
    checkedAt: NotRequired[float]
    code: NotRequired[int]  # the probe's HTTP status
    error: NotRequired[str]  # the probe's exception, by class name


class PreloadJson(TypedDict):
    """A ``preload:`` target and how far it got (``error``: why it was skipped or failed)."""

    target: str
    state: Literal["pending", "loading", "done", "skipped", "failed"]
    error: str | None


class BackendJobJson(TypedDict):
    id: str
    state: Literal["running", "pending"]
    since: str | None


class UnitJson(TypedDict):
    """A unit the scheduler places: the backend as a whole (``model`` None), or one of its
    models (``name`` is ``backend/model``)."""

    name: str
    model: str | None
    state: str  # a scheduler State's value
    vramBytes: int | None  # what it takes when resident, summed over its GPUs; None: a GPU's
    # capacity is unknown (it takes the whole GPU, whatever that is)
    vramSource: Literal["declared", "learned", "estimated", "measured", "unknown", "exclusive"]
    # declared: config; learned: measured on an earlier run; estimated: what its requests asked
    # (a context's KV cache, a workflow's files); measured: telemetry now; unknown: nothing is
    # known, so the whole GPU; exclusive: the whole GPU by policy. On several GPUs: the least
    # certain of theirs.
    measuredBytes: int | None  # what telemetry (or the service, model by model) saw it hold
    active: int  # leases held
    queued: int


class BackendJson(TypedDict):
    state: str  # a scheduler State's value: the busiest of its units'
    owner: bool
    active: int  # these three: summed over its units
    inFlight: int
    jobs: list[BackendJobJson] | None  # None: the service has no queue of its own
    queued: int
    upstream: str
    proxyPort: int
    strategy: str
    gpuRequests: int
    passthroughRequests: int
    refused: int
    upstreamErrors: int
    health: HealthJson
    gpus: list[str]
    declaredVram: int | None
    measuredVram: int | None
    measuredByGpu: dict[str, int | None]
    units: list[UnitJson]  # its own unit when it holds memory or is the only one, then models
    # unless absent with nothing known of them


class LiveEntryJson(TypedDict):
    """A lease (queued or admitted) or a service's own job: OneGPU4All's four fields first."""

    method: str
    url: str
    startedAt: str | None
    backend: str
    unit: str | None  # what it holds in the scheduler: the backend, or ``backend/model``
    kind: Literal["lease", "job"]
    id: int | str
    path: str
    state: str  # active or queued (a lease); running or pending (a job)
    elapsedMs: int | None
    queuedMs: int | None
    caller: str | None  # a lease's: an API key's name, the client's own name, or its address
    model: str | None  # a lease's model, where the api port knows it


class TotalsJson(TypedDict):
    inFlight: int
    leases: int
    jobs: int
    gpuRequests: int
    passthroughRequests: int


class SwapJson(TypedDict):
    at: str | None
    to: str | None
    evicted: list[str]
    drainMs: float
    unloadMs: float
    loadMs: float
    totalMs: float
    failures: list[str]
    reason: str  # request, admin (an unload or swap asked for), idle, unmanaged (memory no
    # backend owns grew)


class QueueEntryJson(TypedDict):
    position: int
    id: int
    backend: str
    unit: str
    waitedMs: int


class TelemetryJson(TypedDict):
    """``source`` None (and no ``takenAt``/``intervalS``) when telemetry is not running."""

    source: str | None
    notice: str | None
    error: str | None
    takenAt: NotRequired[str | None]
    intervalS: NotRequired[float]


class ProcessJson(TypedDict):
    pid: int
    name: str | None
    usedBytes: int | None
    owner: str | None
    visible: bool


class GpuJson(TypedDict):
    index: int
    uuid: str
    name: str
    memoryTotal: int | None
    memoryUsed: int | None
    memoryFree: int | None
    utilization: float | None  # percent
    powerDraw: float | None  # watts
    powerLimit: float | None
    temperature: float | None  # °C
    fan: float | None  # percent
    smClock: int | None  # MHz
    memClock: int | None
    processes: list[ProcessJson]


class GpuPlanJson(TypedDict):
    """One GPU as the scheduler plans it (``gpu``: its key, the index where telemetry knows it)."""

    gpu: str
    capacityBytes: int | None  # usable: declared or total memory, less reserve; None: unknown
    plannedBytes: int | None  # taken by units holding memory plus what nobody owns
    unmanagedBytes: int | None  # held by processes no backend owns, taken off capacity; None:
    # not counted (policy is not budget, or telemetry does not see this GPU)


class WarningJson(TypedDict):
    code: str
    subject: str
    backend: str | None
    message: str
    since: str | None
    sinceTs: float


class StatusJson(TypedDict):
    # OneGPU4All's fields, with its shapes and meanings
    vramOwner: str | None
    activeRequests: dict[str, int]
    queueLength: int
    queuedBackends: list[str]
    gpuRequests: dict[str, int]
    passthroughRequests: dict[str, int]
    swapCount: int
    lastSwapAt: str | None
    liveRequests: list[LiveEntryJson]
    uptime: int
    # ours
    totals: TotalsJson
    policy: str
    swapping: bool
    backends: dict[str, BackendJson]
    swaps: list[SwapJson]
    queue: list[QueueEntryJson]
    telemetry: TelemetryJson
    gpus: list[GpuJson]
    gpuPlan: list[GpuPlanJson]
    warnings: list[WarningJson]
    preload: list[PreloadJson]  # the start-up preload: each target, in order


class WorkerJson(TypedDict):
    """One managed worker in ``GET /api/workers`` (``logTail``/``command`` for admins only)."""

    name: str
    state: str  # a WorkerState's value
    pid: int | None
    adopted: bool
    gpu: list[str]
    upstream: str
    uptime: float | None
    restarts: int
    lastExit: dict[str, Any] | None
    error: str | None
    logTail: NotRequired[list[str]]
    command: NotRequired[list[str]]
    vram: int | None
    warnings: list[str]
