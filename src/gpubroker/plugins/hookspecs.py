"""The hooks a gpubroker plugin can implement.

A plugin is a module (or object) exposed through the ``gpubroker`` entry-point group::

    [project.entry-points.gpubroker]
    sdwebui = "gpubroker_sdwebui"

and implements one or more of the hooks below with ``@gpubroker.hookimpl``. Every hook hands the
plugin a ``register`` callback: the plugin registers *classes*, and gpubroker later creates and
calls them itself. Hooks run once, at start-up; nothing of pluggy sits on the request path, so
the classes' methods may be ``async`` and as fast as the plugin makes them.

Builtins (``ollama``, ``comfyui``, ``vllm``, ``generic`` …) are registered through these very
hooks, so a plugin has exactly the powers a builtin has; a plugin that registers a name a builtin
already uses replaces the builtin.

Always implement hooks with keyword parameters named as below; pluggy passes only the ones your
implementation asks for, so a spec can grow without breaking you.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from gpubroker.plugins.classifiers.base import Classifier
    from gpubroker.plugins.strategies.base import Strategy
    from gpubroker.telemetry.base import TelemetrySource

PROJECT = "gpubroker"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_strategies(register: Callable[[type[Strategy]], None]) -> None:
    """Register unload strategies: how to free a backend's VRAM and bring it back.

    Called once when the plugin manager is created, before any backend is served.

    :param register: call it with each :class:`gpubroker.Strategy` subclass this plugin
        provides. The class's ``name`` is what ``unloadStrategy:`` in the config
        selects; gpubroker creates one instance per backend that uses it.
    :returns: nothing; results are ignored.
    """


@hookspec
def register_classifiers(register: Callable[[type[Classifier]], None]) -> None:
    """Register GPU-endpoint classifiers: which requests to a service need the GPU.

    Called once when the plugin manager is created.

    :param register: call it with each :class:`gpubroker.Classifier` subclass. A backend uses
        the classifier whose ``name`` equals its ``classifier:`` key, or, when that is unset,
        its ``unloadStrategy:``. Only requests the classifier calls GPU work take a lease;
        everything else passes straight through.
    :returns: nothing; results are ignored.
    """


@hookspec
def register_telemetry_sources(register: Callable[[type[TelemetrySource]], None]) -> None:
    """Register telemetry sources: per-GPU totals and per-process VRAM, keyed by GPU UUID.

    Called once when the plugin manager is created.

    :param register: call it with each :class:`gpubroker.TelemetrySource` subclass (its
        ``sample()`` raises :class:`gpubroker.TelemetryError` when the GPUs cannot be read). The
        config's ``telemetry:`` key picks one by ``name`` (``auto`` tries the
        sources in registration order and keeps the first that is available).
    :returns: nothing; results are ignored.
    """
