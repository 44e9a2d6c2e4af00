"""The builtins, registered in one place, through the same hooks a third-party plugin implements.

Three plugins, so each can be disabled on its own by name (``disablePlugins:`` or
``$GPUBROKER_DISABLE_PLUGINS``): ``builtin-strategies``, ``builtin-classifiers`` and
``builtin-telemetry``. The order of each tuple is the order ``gpubroker plugins`` lists them in,
and for telemetry the order ``telemetry: auto`` tries them in.
"""

from __future__ import annotations

from collections.abc import Callable

from gpubroker.plugins.classifiers.base import Classifier
from gpubroker.plugins.classifiers.builtin import (
    ComfyUIClassifier,
    GenericClassifier,
    LlamaCppClassifier,
    OllamaClassifier,
    OpenAIClassifier,
    ProcessClassifier,
    VLLMClassifier,
)
from gpubroker.plugins.hookspecs import hookimpl
from gpubroker.plugins.strategies.base import Strategy
from gpubroker.plugins.strategies.builtin import (
    ComfyUIStrategy,
    GenericStrategy,
    OllamaStrategy,
    VLLMStrategy,
)
from gpubroker.plugins.strategies.process import ProcessStrategy
from gpubroker.telemetry.base import TelemetrySource
from gpubroker.telemetry.nvml import NoTelemetry, NvmlTelemetry
from gpubroker.telemetry.sim import SimTelemetry

BUILTIN_STRATEGIES: tuple[type[Strategy], ...] = (
    OllamaStrategy,
    ComfyUIStrategy,
    VLLMStrategy,
    GenericStrategy,
    ProcessStrategy,
)
BUILTIN_CLASSIFIERS: tuple[type[Classifier], ...] = (
    OllamaClassifier,
    ComfyUIClassifier,
    VLLMClassifier,
    OpenAIClassifier,
    LlamaCppClassifier,
    GenericClassifier,
    ProcessClassifier,
)
BUILTIN_TELEMETRY: tuple[type[TelemetrySource], ...] = (NvmlTelemetry, SimTelemetry, NoTelemetry)


class Strategies:
    @staticmethod
    @hookimpl
    def register_strategies(register: Callable[[type[Strategy]], None]) -> None:
        for cls in BUILTIN_STRATEGIES:
            register(cls)


class Classifiers:
    @staticmethod
    @hookimpl
    def register_classifiers(register: Callable[[type[Classifier]], None]) -> None:
        for cls in BUILTIN_CLASSIFIERS:
            register(cls)


class Telemetry:
    @staticmethod
    @hookimpl
    def register_telemetry_sources(register: Callable[[type[TelemetrySource]], None]) -> None:
        for cls in BUILTIN_TELEMETRY:
            register(cls)


BUILTINS: tuple[tuple[str, object], ...] = (
    ("builtin-strategies", Strategies),
    ("builtin-classifiers", Classifiers),
    ("builtin-telemetry", Telemetry),
)
