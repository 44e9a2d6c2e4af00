"""What a telemetry source is, and the snapshot it returns.

Unknown facts stay ``None``: a source never invents a value it could not read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from gpubroker.config.model import Config


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A process holding memory on a GPU. ``pid`` is a host pid (NVML ignores namespaces).

    ``backend`` is set only by a source that knows the owner directly (the simulator names
    its processes after the emulated service); otherwise attribution works it out from pids.
    """

    pid: int
    used_memory: int | None  # bytes; None when the driver will not say (e.g. in containers)
    name: str | None = None
    backend: str | None = None


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one moment. Memory in bytes, power in watts, clocks in MHz."""

    uuid: str
    index: int
    name: str
    memory_total: int | None = None
    memory_used: int | None = None
    memory_free: int | None = None
    utilization: float | None = None
    power_draw: float | None = None
    power_limit: float | None = None
    temperature: float | None = None
    fan: float | None = None
    sm_clock: int | None = None
    mem_clock: int | None = None
    processes: tuple[GpuProcess, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class TelemetrySnapshot:
    """Every GPU at one moment (``taken_at``: wall-clock seconds)."""

    taken_at: float
    gpus: tuple[GpuSample, ...] = ()
    notice: str | None = None  # why something is missing, in one line
    error: str | None = None  # this reading failed; the GPUs listed carry unknown readings


class TelemetrySource:
    """Base class; subclass it, set ``name`` and implement ``available`` and ``sample``.

    ``sample`` is awaited on the event loop: a source whose library blocks (NVML does) must run
    it in a worker thread (``anyio.to_thread.run_sync``).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    names_owners: ClassVar[bool] = False
    """True when the source sets ``GpuProcess.backend`` itself (then no pid lookups are made)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    async def available(self) -> str | None:
        """None when this source can read GPUs here; otherwise a one-line reason why not."""
        return None

    async def sample(self) -> TelemetrySnapshot:
        """One reading of every GPU; raise :class:`TelemetryError` when it failed this time."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the source holds (e.g. ``nvmlShutdown``)."""
