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

from gpubroker.config.model import BackendConfig, Config
from gpubroker.observe.telemetry.base import TelemetrySnapshot
from gpubroker.plugins.strategies.base import Strategy
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler


def _aliases(snapshot: TelemetrySnapshot | None) -> dict[str, str]:
    """UUID -> index key, so a GPU named either way lands in one domain."""
    if snapshot is None:
        return {}
    return {g.uuid: str(g.index) for g in snapshot.gpus}


def gpu_key(ref: int | str, aliases: Mapping[str, str]) -> str:
    key = str(ref)
    if key in aliases:
        return aliases[key]
    for uuid, index in aliases.items():  # a unique prefix of a UUID, as CUDA accepts
        if key.startswith("GPU-") and uuid.startswith(key):
            return index
    return key


def backend_gpus(backend: BackendConfig, snapshot: TelemetrySnapshot | None) -> tuple[str, ...]:
    aliases = _aliases(snapshot)
    refs = backend.gpu or (0,)
    return tuple(dict.fromkeys(gpu_key(r, aliases) for r in refs))


def cuda_devices(backend: BackendConfig, snapshot: TelemetrySnapshot | None) -> tuple[str, ...]:
    """What a managed worker is pinned to (``CUDA_VISIBLE_DEVICES``): each of its GPUs by UUID
    where telemetry knows it (a UUID names one card whatever CUDA's order), else as configured."""
    aliases = _aliases(snapshot)
    uuids = {index: uuid for uuid, index in aliases.items()}
    refs = backend.gpu or (0,)
    return tuple(dict.fromkeys(uuids.get(gpu_key(r, aliases), str(r)) for r in refs))


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
