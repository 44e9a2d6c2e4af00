"""GPU scheduling domains: which GPU each backend lives on, and how much each GPU may hold.

A backend's ``gpu:`` and a declared ``gpus: [{id: …}]`` may name a GPU by index or by UUID;
telemetry (when present) tells which index has which UUID, so both spellings meet on one key.
Capacity is the declared ``memory`` (else the telemetry total) minus ``reserve``; where neither
is known the domain has no capacity and the scheduler treats it as exclusive.
:func:`build_scheduler` puts these together, with each strategy's costs, into the pure
scheduler for a config.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpubroker.config.model import Config
from gpubroker.config.rules import UnitRef, exclusions
from gpubroker.plugins.strategies.base import Strategy
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler
from gpubroker.scheduling.units import Footprints, model_spec, per_model, unit_name
from gpubroker.telemetry.base import TelemetrySnapshot
from gpubroker.telemetry.gpus import aliases as _aliases
from gpubroker.telemetry.gpus import backend_gpus, gpu_key


def capacities(
    config: Config, snapshot: TelemetrySnapshot | None, *, less_reserve: bool = True
) -> dict[str, int | None]:
    """Usable bytes per GPU key (None where unknown); the card's whole memory with
    ``less_reserve`` false."""
    aliases = _aliases(snapshot)
    totals = {str(g.index): g.memory_total for g in snapshot.gpus} if snapshot else {}
    declared = {gpu_key(g.id, aliases): g for g in config.gpus} if config.gpus != "auto" else {}
    keys = set(totals) | set(declared)
    keys |= {k for b in config.backends for k in backend_gpus(b, snapshot)}
    out: dict[str, int | None] = {}
    for key in sorted(keys):
        spec = declared.get(key)
        total = spec.memory if spec and spec.memory is not None else totals.get(key)
        reserve = spec.reserve if spec and less_reserve else 0
        out[key] = None if total is None else max(0, total - reserve)
    return out


def exclusive_sets(config: Config, strategies: Mapping[str, Strategy]) -> dict[str, frozenset[str]]:
    """The config's ``exclusiveWith`` relation (:func:`~gpubroker.config.rules.exclusions`,
    already symmetric) in unit names: a model of a per-model backend is its unit, by the name
    its service knows it by; a model of any other backend stands for that backend."""

    def unit(ref: UnitRef) -> str:
        strategy = strategies[ref.backend]
        if ref.model is None or not per_model(config, strategy):
            return ref.backend
        spec = next(m for m in config.backend(ref.backend).models or () if m.name == ref.model)
        return unit_name(ref.backend, strategy.model_key(spec.upstream_model or spec.name))

    out: dict[str, set[str]] = {}
    for ref, others in exclusions(config.backends).items():
        out.setdefault(unit(ref), set()).update(unit(o) for o in others)
    return {name: frozenset(names - {name}) for name, names in out.items()}


def build_scheduler(
    config: Config,
    strategies: Mapping[str, Strategy],
    telemetry: TelemetrySnapshot | None,
    *,
    book: Footprints | None = None,
) -> Scheduler:
    """The pure scheduler for ``config``: each backend's GPUs, sizes and its strategy's costs,
    and under the budget policy each declared model of a per-model backend as a unit.

    A backend (or model) that declares no ``vram`` starts from the footprint learned on an
    earlier run (``book``), where there is one."""
    rules = exclusive_sets(config, strategies)
    specs: list[BackendSpec] = []
    for b in config.backends:
        strategy = strategies[b.name]
        learned = book.get(b.name) if book is not None and b.vram is None else None
        need = b.vram if b.vram is not None else learned
        base = BackendSpec(
            name=b.name,
            gpus=backend_gpus(b, telemetry),
            need=need,
            priority=b.priority,
            pinned=b.pinned,
            max_concurrency=b.max_concurrency,
            cost=type(strategy).eviction_cost,
            sleeps=type(strategy).frees_by == "sleep",
            idle_timeout=b.idle_timeout,
            exclusive=rules.get(b.name, frozenset()),
            source="declared" if b.vram is not None else "measured" if need else "unknown",
        )
        specs.append(base)
        if not per_model(config, strategy):
            continue
        for m in b.models or ():
            model = strategy.model_key(m.upstream_model or m.name)
            unit = unit_name(b.name, model)
            if any(s.name == unit for s in specs):
                continue
            specs.append(
                model_spec(
                    base,
                    model,
                    declared=m.vram,
                    learned=book.get(unit) if book is not None else None,
                    pinned=m.pinned,
                    exclusive=rules.get(unit, frozenset()),
                )
            )
    return Scheduler(
        specs,
        capacities=capacities(config, telemetry),
        policy=config.policy,
        queue_timeout=config.queue_timeout,
        hold_time=config.effective_hold_time,
        min_residency=config.min_residency
        if config.min_residency is not None
        else (3.0 if config.policy == "budget" else 0.0),
        aging=config.priority_aging,
    )
