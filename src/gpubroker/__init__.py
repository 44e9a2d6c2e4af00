"""gpubroker: one GPU, many inference services, no OOMs.

The plugin API is public here and stable: ``from gpubroker import hookimpl, Strategy,
Classifier, TelemetrySource`` (see ``gpubroker.plugins.hookspecs`` for the hooks). The names are
loaded on first use, so ``import gpubroker`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gpubroker.version import __version__

if TYPE_CHECKING:
    from gpubroker.errors import TelemetryError
    from gpubroker.plugins.classifiers.base import Classifier, RouteClassifier
    from gpubroker.plugins.hookspecs import hookimpl
    from gpubroker.plugins.strategies.base import Job, Strategy, StrategyContext
    from gpubroker.telemetry.base import (
        GpuProcess,
        GpuSample,
        TelemetrySnapshot,
        TelemetrySource,
    )

_PUBLIC = {
    "hookimpl": ".plugins.hookspecs",
    "Strategy": ".plugins.strategies.base",
    "StrategyContext": ".plugins.strategies.base",
    "Job": ".plugins.strategies.base",
    "Classifier": ".plugins.classifiers.base",
    "RouteClassifier": ".plugins.classifiers.base",
    "TelemetrySource": ".telemetry.base",
    "TelemetryError": ".errors",
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
    "TelemetryError",
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
