"""Telemetry sources: what the GPUs hold and do, keyed by GPU UUID."""

from gpubroker.observe.telemetry.base import (
    GpuProcess,
    GpuSample,
    TelemetryError,
    TelemetrySnapshot,
    TelemetrySource,
)

__all__ = ["GpuProcess", "GpuSample", "TelemetryError", "TelemetrySnapshot", "TelemetrySource"]
