"""``preload:``: the backends and models made resident at start-up, in order, within the budget.

Each target is loaded the way a request would load it: a lease on its unit is taken and at once
released (``Broker.preload``), so the scheduler plans a real load (a managed worker's process
started, an Ollama model loaded, a vLLM woken; a ``backend/model`` whose backend is placed
whole, under ``policy: exclusive``, is its backend's lease held while ``Strategy.load_model``
runs) and requests that arrive meanwhile queue behind it as behind any swap. A preload never
evicts: a target that does not fit beside what is resident then (the earlier preloads, and
whatever the services already held) is *skipped* with a warning; one whose load fails (or times
out: a lease waits ``queueTimeout`` at most, a load ``startTimeout``) is *failed*, logged and
shown as a ``preload_failed`` warning; the broker serves either way. Progress is in the status
JSON (``preload``) and on ``/events`` (:class:`~gpubroker.events.Preload`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio

from gpubroker import events as ev
from gpubroker.config.rules import preload_ref
from gpubroker.errors import Refused
from gpubroker.scheduling.scheduler import HOLDS_VRAM, Scheduler, State

if TYPE_CHECKING:
    from gpubroker.scheduling.broker import Broker

log = logging.getLogger("gpubroker.scheduling.broker")

PreloadState = Literal["pending", "loading", "done", "skipped", "failed"]


@dataclass(slots=True)
class PreloadStep:
    """One ``preload:`` entry and how far it got."""

    target: str
    state: PreloadState = "pending"
    error: str | None = None


def fits_beside(sched: Scheduler, unit: str) -> str | None:
    """Why ``unit`` cannot be loaded without evicting what holds memory now, or None when it
    can (it is resident already, or every GPU of it has the room, and nothing it must never
    share the GPU with is resident)."""
    slot = sched.slots[unit]
    if slot.state is State.RESIDENT:
        return None
    for other in sched.slots.values():
        if other.name == unit or other.state not in HOLDS_VRAM:
            continue
        a, b = slot.spec, other.spec
        if {b.name, b.backend} & a.exclusive or {a.name, a.backend} & b.exclusive:
            return f"{other.name} holds the GPU and may never share it with {unit}"
    for gpu in slot.spec.gpus:
        cap = sched.capacity.get(gpu)
        used = sched.used(gpu)
        if cap is None or sched.policy == "exclusive":
            holders = [
                s.name
                for s in sched.slots.values()
                if s.name != unit and gpu in s.spec.gpus and s.state in HOLDS_VRAM
            ]
            if holders:
                return f"GPU {gpu} is held by {', '.join(holders)} (policy {sched.policy})"
            continue
        need = sched.size(unit, gpu)
        if used + need > cap:
            return (
                f"it needs {need / 2**30:.1f} GiB on GPU {gpu}, where "
                f"{max(0, cap - used) / 2**30:.1f} GiB is free beside what is resident"
            )
    return None


async def preload_all(broker: Broker, targets: tuple[str, ...] | list[str]) -> None:
    """Make ``targets`` resident, one after the other; never raises."""
    steps = broker.preloads = [PreloadStep(t) for t in targets]
    for step in steps:
        _tell(broker, step)
    for step in steps:
        if broker.closing:
            _set(broker, step, "skipped", "the broker is stopping")
            continue
        try:
            unit, model = _unit(broker, step.target)
        except ValueError as exc:
            _set(broker, step, "failed", str(exc))
            continue
        why = fits_beside(broker.sched, unit)
        if why is not None:
            _set(broker, step, "skipped", f"does not fit beside what is resident: {why}")
            continue
        _set(broker, step, "loading")
        try:
            if model is None:
                await broker.preload(unit)
            else:  # a model on a backend placed whole: the backend's lease, then its model
                await _load_inside(broker, unit, model)
        except Refused as exc:
            await _failed(broker, step, unit, exc.message)
            continue
        except Exception as exc:  # a preload must never take the broker down
            await _failed(broker, step, unit, f"{type(exc).__name__}: {exc}")
            continue
        if broker.sched.state(unit) is State.RESIDENT:
            _set(broker, step, "done")
        else:
            state = broker.sched.state(unit).value
            _set(broker, step, "failed", f"{unit} is {state} after its load")


async def _load_inside(broker: Broker, backend: str, model: str) -> None:
    """Hold ``backend``'s lease (it is loaded for it) while its strategy loads ``model``."""
    limit = broker.config.backend(backend).start_timeout
    async with broker.lease(backend, "(preload)", count=False):
        with anyio.fail_after(limit):
            await broker.strategies[backend].load_model(model)


def _unit(broker: Broker, target: str) -> tuple[str, str | None]:
    """The scheduler's unit for ``target`` (a model unit made now when it is new), and the
    model to load inside the backend's lease where the backend is placed whole."""
    ref = preload_ref(broker.config.backends, target)
    if isinstance(ref, str):  # a checked config names nothing unknown
        raise ValueError(ref)
    backend = ref.backend
    per_model = backend in broker.units.per_model
    if ref.model is None:
        if per_model:
            raise ValueError(
                f"{backend} places its models one by one: preload one of them ({backend}/MODEL)"
            )
        return backend, None
    model = ref.model
    for m in broker.config.backend(backend).models or ():
        if m.name == model:
            model = m.upstream_model or m.name  # what the service itself calls it
    if not per_model:
        return backend, model
    return broker.units.ensure(backend, model), None


async def _failed(broker: Broker, step: PreloadStep, unit: str, error: str) -> None:
    """A failed load may leave its unit counted as holding memory: where the service says
    what it holds model by model (Ollama), ask it, so the next target is judged on the truth."""
    _set(broker, step, "failed", error)
    backend = broker.sched.slots[unit].spec.backend
    if backend in broker.units.per_model:
        with anyio.move_on_after(broker.config.unload_timeout):
            await broker.units.follow(backend)


def _set(broker: Broker, step: PreloadStep, state: PreloadState, error: str | None = None) -> None:
    step.state, step.error = state, error
    if state == "failed":
        log.warning("preload %s failed: %s", step.target, error)
    elif state == "skipped":
        log.warning("preload %s skipped: %s", step.target, error)
    elif state == "done":
        log.info("preload %s: resident", step.target)
    _tell(broker, step)


def _tell(broker: Broker, step: PreloadStep) -> None:
    backend = step.target.partition("/")[0]
    broker.bus.publish(
        ev.Preload(backend=backend, target=step.target, state=step.state, error=step.error)
    )
