"""Telemetry sources: what the GPUs hold and do, keyed by GPU UUID."""

from .base import GpuProcess, GpuSample, TelemetryError, TelemetrySnapshot, TelemetrySource

__all__ = ["GpuProcess", "GpuSample", "TelemetryError", "TelemetrySnapshot", "TelemetrySource"]
