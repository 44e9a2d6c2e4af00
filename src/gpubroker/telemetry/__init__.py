"""GPU readings: what the GPUs hold and do, keyed by GPU UUID.

``base`` is the plugin contract (``TelemetrySource``, ``TelemetrySnapshot``, ``GpuSample``,
``GpuProcess``), ``nvml`` the NVIDIA source (NVML calls run in a worker thread) and the
``none`` source, ``sim`` the simulator's, ``sampler`` bounded single-flight samples shared by
everyone who asks, ``gpus`` which GPU a config reference names (index, UUID or prefix).

Imports only ``config`` and ``errors``; the rooms above read it (scheduling for GPU sizes,
workers for pinning, observe for attribution and alerts).
"""

from gpubroker.errors import TelemetryError  # what a source raises for one failed sample
from gpubroker.telemetry.base import (
    GpuProcess,
    GpuSample,
    TelemetrySnapshot,
    TelemetrySource,
)

__all__ = ["GpuProcess", "GpuSample", "TelemetryError", "TelemetrySnapshot", "TelemetrySource"]
