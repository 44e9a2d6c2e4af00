"""gpubroker: one GPU, many inference services, no OOMs.

The plugin API is public here and stable: ``from gpubroker import hookimpl, Strategy,
Classifier, TelemetrySource`` (see ``gpubroker.hookspecs`` for the hooks). The names are
loaded on first use, so ``import gpubroker`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("gpubroker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

if TYPE_CHECKING:
    from .classifiers.base import Classifier, RouteClassifier
    from .hookspecs import hookimpl
    from .strategies.base import Job, Strategy, StrategyContext
    from .telemetry.base import GpuProcess, GpuSample, TelemetrySnapshot, TelemetrySource

_PUBLIC = {
    "hookimpl": ".hookspecs",
    "Strategy": ".strategies.base",
    "StrategyContext": ".strategies.base",
    "Job": ".strategies.base",
    "Classifier": ".classifiers.base",
    "RouteClassifier": ".classifiers.base",
    "TelemetrySource": ".telemetry.base",
    "TelemetrySnapshot": ".telemetry.base",
    "GpuSample": ".telemetry.base",
    "GpuProcess": ".telemetry.base",
}

__all__ = [
    "Classifier",
    "GpuProcess",
    "GpuSample",
    "Job",
    "RouteClassifier",
    "Strategy",
    "StrategyContext",
    "TelemetrySnapshot",
    "TelemetrySource",
    "__version__",
    "hookimpl",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'gpubroker' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
