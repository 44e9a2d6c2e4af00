"""What each GPU holds, unit by unit: the part of the read model that shows the scheduler's plan.

A unit is what the scheduler places (a backend as a whole, or one model of a backend that frees
models one by one, ``backend/model``). Each is shown with what it is planned to take and where
that figure comes from (:meth:`~gpubroker.scheduling.scheduler.Scheduler.footprint`), so a
reader can tell a declared size from a measured one from a guess; each GPU with its capacity,
what is planned on it, and the memory no backend owns that the scheduler takes off it.
:mod:`~gpubroker.observe.readmodel` puts these views in its :class:`StatusView`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal, cast

from gpubroker.observe.schema import GpuPlanJson, UnitJson
from gpubroker.scheduling.scheduler import HOLDS_VRAM, Scheduler, State

Source = Literal["declared", "learned", "estimated", "measured", "unknown", "exclusive"]
# A unit on several GPUs shows the least certain of its GPUs' sources.
_LEAST_CERTAIN_FIRST: tuple[Source, ...] = (
    "unknown",
    "exclusive",
    "estimated",
    "learned",
    "declared",
    "measured",
)


@dataclass(frozen=True, slots=True)
class UnitView:
    """One unit as the scheduler sees it now. Sizes in bytes, summed over its GPUs."""

    name: str  # the backend's name, or ``backend/model``
    backend: str
    model: str | None  # None: the backend's own unit
    state: State
    vram: int | None  # what it takes when resident; None: a GPU's capacity is unknown
    source: Source
    measured: int | None  # what telemetry (or the service, model by model) saw; None: not seen
    known: bool  # anything is known of its size: declared, learned, estimated or measured
    active: int  # leases held
    queued: int

    @property
    def holds(self) -> bool:
        """Whether the scheduler counts it as holding memory (resident, or in a swap step, or
        unknown at start-up)."""
        return self.state in HOLDS_VRAM


@dataclass(frozen=True, slots=True)
class GpuPlanView:
    """One GPU as the scheduler plans it; None where the figure is not known."""

    gpu: str  # the scheduler's key: the index where telemetry knows it
    capacity: int | None  # usable bytes (declared or total, less reserve)
    planned: int | None  # bytes planned as taken: units holding memory, and what nobody owns
    unmanaged: int | None  # None: not counted (policy is not budget, or telemetry misses it)


def units_of(sched: Scheduler, backend: str) -> tuple[UnitView, ...]:
    """Every unit of ``backend``: its own first, then its models in the order they came."""
    return tuple(_unit(sched, name) for name in sched.units_of(backend))


def listed(units: tuple[UnitView, ...]) -> tuple[UnitView, ...]:
    """The units worth a line: the backend's own when it holds memory or is its only unit, a
    model unless it is absent with nothing known of it (any model ever asked for has a unit)."""
    only = len(units) == 1

    def worth(u: UnitView) -> bool:
        return (only or u.holds) if u.model is None else (u.holds or u.known)

    return tuple(u for u in units if worth(u))


def plan(sched: Scheduler, seen: Collection[str]) -> tuple[GpuPlanView, ...]:
    """Each GPU the scheduler plans for. ``seen``: the GPU keys telemetry's last sample had,
    the ones whose unowned memory the monitor reports (a GPU it misses reads unknown)."""
    budget = sched.policy == "budget"
    out = []
    for gpu, capacity in sched.capacity.items():
        out.append(
            GpuPlanView(
                gpu=gpu,
                capacity=capacity,
                planned=None if capacity is None else sched.used(gpu),
                unmanaged=sched.unowned.get(gpu, 0) if budget and gpu in seen else None,
            )
        )
    return tuple(out)


def _unit(sched: Scheduler, name: str) -> UnitView:
    slot = sched.slots[name]
    spec = slot.spec
    sizes = [sched.footprint(name, gpu) for gpu in spec.gpus]
    sources = {cast(Source, source) for _, source in sizes}
    unknown_capacity = any(sched.capacity.get(gpu) is None for gpu in spec.gpus)
    return UnitView(
        name=name,
        backend=spec.backend,
        model=spec.model,
        state=slot.state,
        vram=None if unknown_capacity else sum(size for size, _ in sizes),
        source=next(s for s in _LEAST_CERTAIN_FIRST if s in sources) if sources else "unknown",
        measured=sum(slot.measured.values()) if slot.measured else None,
        known=spec.need is not None or slot.estimate is not None or bool(slot.measured),
        active=sched.active(name),
        queued=sched.queued(name),
    )


def unit_json(u: UnitView) -> UnitJson:
    return {
        "name": u.name,
        "model": u.model,
        "state": u.state.value,
        "vramBytes": u.vram,
        "vramSource": u.source,
        "measuredBytes": u.measured,
        "active": u.active,
        "queued": u.queued,
    }


def plan_json(p: GpuPlanView) -> GpuPlanJson:
    return {
        "gpu": p.gpu,
        "capacityBytes": p.capacity,
        "plannedBytes": p.planned,
        "unmanagedBytes": p.unmanaged,
    }
