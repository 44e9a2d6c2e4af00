"""Telemetry sources: what the GPUs hold and do, keyed by GPU UUID."""

from gpubroker.errors import TelemetryError  # what a source raises for one failed sample
from gpubroker.observe.telemetry.base import (
    GpuProcess,
    GpuSample,
    TelemetrySnapshot,
    TelemetrySource,
)

__all__ = ["GpuProcess", "GpuSample", "TelemetryError", "TelemetrySnapshot", "TelemetrySource"]
