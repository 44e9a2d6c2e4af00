"""Which unit a GPU request takes, and what it asks of it.

Under ``policy: budget`` a backend whose strategy frees models one by one (``per_model``) has a
unit per model, ``backend/model``, made when a model is first declared, asked for or seen
loaded; its footprint is the declared ``vram`` of that model, else the one learned from an
earlier run, else unknown (the whole GPU until a request's estimate or a measurement tells
more). A request's strategy reads its body (:meth:`~gpubroker.plugins.strategies.base.Strategy.
demand`): the model it names and what that needs at the request's context size, or the model
files a ComfyUI workflow loads. ComfyUI keeps files cached until freed, so a workflow asks for
what is cached plus its new files, or — were ComfyUI freed first — its files alone.

:class:`Units` also follows what a per-model service holds (``loaded_models``, Ollama's
``/api/ps``) so a model the service let go by itself, or loaded for someone else, is seen, and
learns footprints from what is measured, for the next start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import anyio

from gpubroker.config.model import Config
from gpubroker.plugins.strategies.base import Demand, Strategy
from gpubroker.scheduling.effects import Effect
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler, Source, State

log = logging.getLogger("gpubroker.scheduling.units")

SAVE_EVERY = 10.0  # seconds between writes of learned footprints, at most


class Footprints(Protocol):
    """Learned footprints kept across restarts (``FootprintBook``), by unit or file key."""

    def get(self, key: str) -> int | None: ...
    def record(self, key: str, nbytes: int) -> None: ...
    async def save(self) -> None: ...


def unit_name(backend: str, model: str | None) -> str:
    """A model unit's name, ``backend/model``; the backend's own unit is its name."""
    return backend if model is None else f"{backend}/{model}"


def file_key(backend: str, name: str) -> str:
    """The footprint key of a model file a backend loads (a ComfyUI checkpoint)."""
    return f"{backend}#{name}"


def per_model(config: Config, strategy: Strategy) -> bool:
    """Whether the backend's models are units of their own (budget policy, and a strategy that
    frees them one by one)."""
    return config.policy == "budget" and type(strategy).per_model


def declared_models(config: Config, backend: str, strategy: Strategy) -> dict[str, int | None]:
    """The models a backend declares, by the name its service knows them by, with their vram."""
    models = config.backend(backend).models or ()
    return {strategy.model_key(m.upstream_model or m.name): m.vram for m in models}


def model_spec(
    base: BackendSpec,
    model: str,
    *,
    declared: int | None,
    learned: int | None,
    pinned: bool = False,
    exclusive: frozenset[str] = frozenset(),
) -> BackendSpec:
    """A model unit of the backend whose own unit is ``base``: its GPUs, priority, costs and
    limits; its own rules; its footprint: the model's declared ``vram``, else the one learned
    on an earlier run, else the backend's declared ``vram`` (the worst case its user stated),
    else unknown."""
    source: Source
    if declared is not None:
        need, source = declared, "declared"
    elif learned is not None:
        need, source = learned, "measured"
    elif base.need is not None and base.source == "declared":
        need, source = base.need, "backend"
    else:
        need, source = None, "unknown"
    return replace(
        base,
        name=unit_name(base.name, model),
        group=base.name,
        model=model,
        need=need,
        source=source,
        pinned=base.pinned or pinned,
        exclusive=base.exclusive | exclusive,
    )


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a request goes: its unit, what it asks of it (``need``, and ``fresh`` were the
    unit freed first), the model it names and the files it loads."""

    unit: str
    need: int | None = None  # 0: it takes no memory at all (an unload request)
    fresh: int | None = None
    model: str | None = None
    parts: tuple[str, ...] = ()


@dataclass(slots=True)
class _Loading:
    """A workflow's new files, and what its backend held before it ran (to learn their size)."""

    before: int
    files: tuple[str, ...]


@dataclass(slots=True)
class _Cache:
    """The files a ComfyUI-like backend was asked to load since it was last freed."""

    files: dict[str, int | None] = field(default_factory=dict)
    loading: list[_Loading] = field(default_factory=list)


class Units:
    """Places requests on units and keeps what is learned of them (one per broker)."""

    def __init__(
        self,
        config: Config,
        strategies: Mapping[str, Strategy],
        sched: Scheduler,
        apply: Callable[[list[Effect]], None],
        *,
        book: Footprints | None = None,
        clock: Callable[[], float],
        measured_total: Callable[[str], int | None],
    ) -> None:
        """``apply``: the broker's way to carry out the scheduler's effects; ``book``: learned
        footprints; ``measured_total``: what telemetry last saw a backend hold, in all."""
        self.config = config
        self.strategies = strategies
        self.sched = sched
        self.apply = apply
        self.book = book
        self.clock = clock
        self.measured_total = measured_total
        self.per_model = {n for n, s in strategies.items() if per_model(config, s)}
        self._reads = {
            n for n, s in strategies.items() if config.policy == "budget" and s.reads_demand
        }
        self._caches: dict[str, _Cache] = {}
        self._learned: dict[str, int] = {}  # what this run measured, the most of it
        self._touched: dict[str, float] = {}  # unit -> when a load or unload of it ended

    # --- placing --------------------------------------------------------------------------

    def reads_body(self, backend: str) -> bool:
        """Whether a GPU request for ``backend`` should bring its body to :meth:`place`."""
        return backend in self._reads

    async def place(self, backend: str, method: str, path: str, body: bytes | None) -> Placed:
        """The unit of a request for ``backend`` and what it asks; a strategy that cannot
        read the body (or takes too long) leaves it on the backend's own unit, sized as
        before."""
        if backend not in self._reads or body is None:
            return Placed(backend)
        strategy = self.strategies[backend]
        demand: Demand | None = None
        with anyio.move_on_after(self.config.unload_timeout):
            try:
                demand = await strategy.demand(method, path, body)
            except Exception as exc:  # a strategy's bug must not fail the request
                log.warning("%s: reading the request's demand failed: %s", backend, exc)
        if demand is None:
            return Placed(backend)
        if demand.parts:
            return self._place_files(backend, demand)
        if demand.model is not None and backend in self.per_model:
            unit = self.ensure(backend, demand.model)
            return Placed(unit, need=demand.need, model=demand.model)
        return Placed(backend, need=demand.need, model=demand.model)

    def _place_files(self, backend: str, demand: Demand) -> Placed:
        """A workflow's files: cached + new, or (freed first) its own; unknown sizes keep the
        backend's footprint (its declared worst case, or the whole GPU)."""
        sizes = {f: self.file_size(backend, f) for f in demand.parts}
        if any(v is None for v in sizes.values()):
            return Placed(backend, parts=demand.parts)
        extra = demand.need or 0  # what the workflow needs beyond its files
        cache = self._caches.setdefault(backend, _Cache())
        cached = {f: v for f, v in cache.files.items() if f not in sizes}
        if any(v is None for v in cached.values()):
            fresh = sum(v or 0 for v in sizes.values()) + extra
            return Placed(backend, need=None, fresh=fresh, parts=demand.parts)
        own = sum(v or 0 for v in sizes.values()) + extra
        need = own + sum(v or 0 for v in cached.values())
        return Placed(backend, need=need, fresh=own if cached else None, parts=demand.parts)

    def file_size(self, backend: str, name: str) -> int | None:
        """A model file's footprint: declared under the backend's ``models:``, else learned."""
        declared = self._declared_file(backend, name)
        if declared is not None:
            return declared
        return self.book.get(file_key(backend, name)) if self.book else None

    def _declared_file(self, backend: str, name: str) -> int | None:
        for m in self.config.backend(backend).models or ():
            if name in m.names and m.vram is not None:
                return m.vram
        return None

    def ensure(self, backend: str, model: str) -> str:
        """The unit of ``model`` on ``backend``, made now if it is new."""
        name = unit_name(backend, model)
        if name not in self.sched.slots:
            spec = self.sched.slots[backend].spec
            self.sched.add_unit(
                model_spec(
                    spec,
                    model,
                    declared=None,
                    learned=self.book.get(name) if self.book else None,
                )
            )
        return name

    def admitted(self, placed: Placed) -> None:
        """A request was admitted: a poll of its unit begun before is stale now; files it
        holds join its backend's cache."""
        self.touched(placed.unit)
        if not placed.parts:
            return
        cache = self._caches.setdefault(placed.unit, _Cache())
        new = tuple(f for f in placed.parts if f not in cache.files)
        for f in placed.parts:
            cache.files[f] = self.file_size(placed.unit, f)
        before = self.measured_total(placed.unit)
        if new and before is not None:
            cache.loading.append(_Loading(before, new))

    def unloaded(self, unit: str) -> None:
        """``unit`` was freed (or tried to be): its cache is gone, and what is polled about it
        from before now is stale."""
        self._caches.pop(unit, None)
        self._touched[unit] = self.clock()

    def touched(self, unit: str) -> None:
        """A load of ``unit`` ended, or a lease on it began or ended: what was polled of it
        before now may be stale (Ollama loads a model as its request arrives)."""
        self._touched[unit] = self.clock()

    # --- learning -------------------------------------------------------------------------

    def measured(self, backend: str, total: int | None, idle: bool) -> None:
        """Telemetry's total for a backend. A whole backend that reads no demand learns its
        footprint while resident; a workflow's new files learn theirs from how much its
        backend grew once idle."""
        if total is None or total <= 0:
            return
        if backend not in self._reads and self.sched.state(backend) is State.RESIDENT:
            self._learn(backend, total)
        cache = self._caches.get(backend)
        if cache is None or not cache.loading or not idle:
            return
        for job in cache.loading:
            grew = total - job.before
            if grew <= 0:
                continue
            each = grew // len(job.files)
            for f in job.files:
                if self._declared_file(backend, f) is None:
                    self._learn(file_key(backend, f), each)
                    cache.files[f] = max(cache.files.get(f) or 0, each)
        cache.loading.clear()

    def _learn(self, key: str, nbytes: int, *, latest: bool = False) -> None:
        """The most ``key`` was seen to take this run (with ``latest``, what it took when last
        seen at rest: a model's size follows the context it runs at): its footprint from now
        on (a unit's in the scheduler, unless declared) and on the next start (the book)."""
        seen = self._learned.get(key, 0)
        if nbytes == seen or (nbytes < seen and not latest):
            return
        self._learned[key] = nbytes
        if key in self.sched.slots:
            self.sched.learned(key, nbytes)
        if self.book is not None:
            self.book.record(key, nbytes)

    async def save(self) -> None:
        if self.book is not None:
            await self.book.save()

    async def keep_saved(self) -> None:
        """Write what was learned every ``SAVE_EVERY`` seconds (a no-op when nothing was),
        until cancelled; the broker saves once more as it stops."""
        while True:
            await anyio.sleep(SAVE_EVERY)
            await self.save()

    # --- following what a per-model service holds -----------------------------------------

    async def still_loaded(self, unit: str) -> bool:
        """After a failed unload: does the service still list the model? (True when it cannot
        say: a model that may still be there must not be loaded over.)"""
        spec = self.sched.slots[unit].spec
        loaded = await self._loaded(spec.backend)
        return loaded is None or spec.model in loaded

    async def _loaded(self, backend: str) -> dict[str, int] | None:
        """The service's own list of what it holds, bounded; None when it cannot say."""
        with anyio.move_on_after(self.config.unload_timeout):
            try:
                return await self.strategies[backend].loaded_models()
            except Exception as exc:  # down or confused: nothing to go by
                log.debug("%s: cannot read its loaded models: %s", backend, exc)
        return None

    async def follow(self, backend: str) -> None:
        """Read what ``backend`` holds now, model by model, and tell the scheduler (what it
        cannot say leaves things as they were)."""
        asked = self.clock()
        loaded = await self._loaded(backend)
        if loaded is None:
            return
        effects: list[Effect] = []
        gpus = self.sched.slots[backend].spec.gpus
        seen: set[str] = set()
        for model, nbytes in loaded.items():
            unit = self.ensure(backend, model)
            seen.add(unit)
            if self._touched.get(unit, float("-inf")) >= asked:
                continue  # a load or unload ended while we asked: this reading is stale
            for gpu in gpus:
                effects += self.sched.measured(unit, gpu, nbytes // len(gpus), self.clock())
            effects += self.sched.observed(unit, True, self.clock())
            slot = self.sched.slots[unit]
            if slot.state is State.RESIDENT and not slot.busy and nbytes > 0:
                self.sched.settle(unit)  # what it holds at rest, at whatever context it runs
                self._learn(unit, nbytes, latest=True)
        for unit in self.sched.units_of(backend):
            if unit not in seen and self._touched.get(unit, float("-inf")) < asked:
                effects += self.sched.observed(unit, False, self.clock())
        self.apply(effects)
        await self.save()

    async def follow_all(self) -> None:
        """Follow every per-model backend, each telemetry interval, until cancelled."""
        while True:
            for backend in sorted(self.per_model):
                await self.follow(backend)
            await anyio.sleep(self.config.telemetry_interval)

    def reconfigure(self, config: Config) -> None:
        """A reload: the config from now on, and which backends (their strategies may be new)
        place requests by model or read their bodies."""
        self.config = config
        self.per_model = {n for n, s in self.strategies.items() if per_model(config, s)}
        self._reads = {
            n for n, s in self.strategies.items() if config.policy == "budget" and s.reads_demand
        }
