"""What ``/v1/models`` says of each model's place on this node: resident or not, and how many
requests wait for it, so that a router in front of several brokers can send a request where its
model already is (docs/scale-out.md lists these signals beside ``/metrics``).

A model is served by a unit (:mod:`gpubroker.scheduling.units`): under ``policy: budget`` a
backend that frees models one by one (Ollama) has a unit per model, ``backend/model``, named as
its strategy names the model (Ollama: the name ``/api/ps`` shows, ``llama3.2:latest``); any
other backend serves every model it has from its own unit. A model unit not made yet (a model
nobody asked for since the start) is absent.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from gpubroker.api.catalogue import Route
from gpubroker.plugins.strategies.ollama import canonical_model
from gpubroker.scheduling.scheduler import State
from gpubroker.scheduling.units import unit_name


class Units(Protocol):
    """What this reads of the scheduler (read-only): a unit's state and its waiters."""

    def state(self, backend: str) -> State: ...

    def units_of(self, backend: str) -> list[str]: ...

    def queued(self, backend: str | None = None) -> int: ...


class Occupancy:
    """Each model's ``state``, ``resident`` and ``queued``, read from the scheduler now."""

    def __init__(self, units: Units, per_model: Collection[str], ollama: Collection[str]) -> None:
        self._units = units
        self._per_model = frozenset(per_model)  # backends placed model by model
        self._ollama = frozenset(ollama)  # whose model units carry Ollama's canonical name

    def unit(self, route: Route) -> str | None:
        """The unit that serves ``route`` now; None: a model unit not made yet (absent)."""
        backend = route.backend
        if backend not in self._per_model:
            return backend
        model = route.upstream
        if backend in self._ollama:
            model = canonical_model(model) or model
        name = unit_name(backend, model)
        return name if name in self._units.units_of(backend) else None

    def of(self, route: Route) -> dict[str, Any]:
        """The fields ``/v1/models`` adds under ``gpubroker`` for ``route``'s model."""
        unit = self.unit(route)
        state = State.ABSENT if unit is None else self._units.state(unit)
        return {
            "unit": unit or unit_name(route.backend, route.upstream),
            "state": state.value,
            "resident": state is State.RESIDENT,
            "queued": 0 if unit is None else self._units.queued(unit),
        }
