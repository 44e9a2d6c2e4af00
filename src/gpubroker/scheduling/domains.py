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
from gpubroker.plugins.strategies.base import Strategy
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler
from gpubroker.telemetry.base import TelemetrySnapshot
from gpubroker.telemetry.gpus import aliases as _aliases
from gpubroker.telemetry.gpus import backend_gpus, gpu_key


def capacities(config: Config, snapshot: TelemetrySnapshot | None) -> dict[str, int | None]:
    """Usable bytes per GPU key (None where unknown)."""
    aliases = _aliases(snapshot)
    totals = {str(g.index): g.memory_total for g in snapshot.gpus} if snapshot else {}
    declared = {gpu_key(g.id, aliases): g for g in config.gpus} if config.gpus != "auto" else {}
    keys = set(totals) | set(declared)
    keys |= {k for b in config.backends for k in backend_gpus(b, snapshot)}
    out: dict[str, int | None] = {}
    for key in sorted(keys):
        spec = declared.get(key)
        total = spec.memory if spec and spec.memory is not None else totals.get(key)
        reserve = spec.reserve if spec else 0
        out[key] = None if total is None else max(0, total - reserve)
    return out


def build_scheduler(
    config: Config, strategies: Mapping[str, Strategy], telemetry: TelemetrySnapshot | None
) -> Scheduler:
    """The pure scheduler for ``config``: each backend's GPUs, sizes and its strategy's costs."""
    return Scheduler(
        [
            BackendSpec(
                name=b.name,
                gpus=backend_gpus(b, telemetry),
                need=b.vram,
                priority=b.priority,
                pinned=b.pinned,
                max_concurrency=b.max_concurrency,
                cost=type(strategies[b.name]).eviction_cost,
                sleeps=type(strategies[b.name]).frees_by == "sleep",
                idle_timeout=b.idle_timeout,
            )
            for b in config.backends
        ],
        capacities=capacities(config, telemetry),
        policy=config.policy,
        queue_timeout=config.queue_timeout,
        hold_time=config.effective_hold_time,
        min_residency=config.min_residency
        if config.min_residency is not None
        else (3.0 if config.policy == "budget" else 0.0),
        aging=config.priority_aging,
    )
