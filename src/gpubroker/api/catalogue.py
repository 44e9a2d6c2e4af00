"""Which backend serves which model: static ``models:``, else discovered from the service.

Discovery reads Ollama's ``/api/tags`` or an OpenAI-style ``/v1/models`` (vLLM, llama.cpp's
server, anything compatible) every ``modelRefresh``, and at once when a request names a model
nobody has. Each backend is read on its own: at most one read of it under way (askers share
it), and an unknown name re-reads it only if its last read *ended* at least
``UNKNOWN_REFRESH_EVERY`` ago, so a backend whose reads time out is not asked again by every
request. The asker waits for the reads under way at most ``UNKNOWN_WAIT`` from their start,
and sooner if the name turns up: a blackholed backend does not delay answers from the others.
Reads run in :meth:`Catalogue.run`'s task group, so an asker that stops waiting does not
cancel them. A backend that does not answer keeps its last known models, marked unreachable
(logged once per outage).

A model on several backends goes to the one that is cheapest to serve from now: a reachable
backend before one that is down, then resident (or already loading), then asleep (it wakes
faster than a cold load), then the lowest ``eviction_cost`` (the cheapest to bring in), then
config order. Residency is read through :class:`Residency`, which the scheduler satisfies.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import httpx

from gpubroker.config.model import BackendConfig, ModelSpec
from gpubroker.errors import ModelNotFound
from gpubroker.scheduling.scheduler import State

log = logging.getLogger("gpubroker.api.catalogue")

DISCOVERY_TIMEOUT = 5.0  # s: one backend's model list; a slow one is treated as down
UNKNOWN_REFRESH_EVERY = 5.0  # s: an unknown model re-reads a backend this long after its last read
UNKNOWN_WAIT = 1.0  # s: how long from a read's start a request for an unknown model waits on it
OLLAMA = "ollama"
UNLISTED = frozenset({"comfyui"})  # strategies whose service names no models
_RANK = {State.RESIDENT: 0, State.LOADING: 0, State.ASLEEP: 1}


class Residency(Protocol):
    """The one thing the catalogue asks the scheduler: a backend's state now."""

    def state(self, backend: str) -> State: ...


@dataclass(frozen=True, slots=True)
class Route:
    """Where a name goes: ``backend``, listed as ``model``, sent upstream as ``upstream``."""

    backend: str
    model: str
    upstream: str
    alias_of: str | None = None


@dataclass(slots=True)
class _Read:
    """One read of a backend's list under way: when it began, and set when it ends."""

    started: float
    done: anyio.Event


@dataclass(slots=True)
class _Known:
    routes: dict[str, Route]
    reachable: bool = True
    discovered: bool = False
    read_at: float = -math.inf  # when its last read ended
    reading: _Read | None = None


def is_ollama(backend: BackendConfig) -> bool:
    return OLLAMA in (backend.unload_strategy, backend.classifier_name)


def _static(backend: str, specs: Iterable[ModelSpec]) -> dict[str, Route]:
    out: dict[str, Route] = {}
    for spec in specs:
        upstream = spec.upstream_model or spec.name
        out[spec.name] = Route(backend, spec.name, upstream)
        for alias in spec.aliases:
            out[alias] = Route(backend, alias, upstream, alias_of=spec.name)
    return out


def _discovered(backend: str, names: Iterable[str], ollama: bool) -> dict[str, Route]:
    out: dict[str, Route] = {}
    for name in names:
        out[name] = Route(backend, name, name)
    if ollama:  # Ollama reads "llama3" as "llama3:latest"
        for name in list(out):
            short = name.removesuffix(":latest")
            if short != name and short not in out:
                out[short] = Route(backend, short, name, alias_of=name)
    return out


class Catalogue:
    """Every backend's models, kept current; ``resolve`` picks the backend for a name."""

    def __init__(
        self,
        backends: Sequence[BackendConfig],
        *,
        client: httpx.AsyncClient,
        refresh_every: float,
        residency: Residency,
        costs: Mapping[str, int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backends = tuple(backends)
        self._client = client
        self._refresh_every = refresh_every
        self._residency = residency
        self._costs = costs
        self._clock = clock
        self._order = {b.name: i for i, b in enumerate(self.backends)}
        self._known = {
            b.name: _Known(_static(b.name, b.models or ()), discovered=b.models is None)
            for b in self.backends
        }
        self._by_name = {b.name: b for b in self.backends}
        self._asked: deque[str] = deque()  # backends to read, for run() to start
        self._wake: anyio.Event | None = None  # run() waits on it for the next ask
        self._ended: anyio.Event | None = None  # set (and replaced) whenever a read ends
        self._reads = 0  # full refreshes completed

    # --- reading ------------------------------------------------------------------------

    def reachable(self, backend: str) -> bool:
        return self._known[backend].reachable

    def routes(self, name: str, among: Iterable[str] | None = None) -> list[Route]:
        """Every route for ``name``, the preferred first."""
        allowed = None if among is None else set(among)
        found = [
            known.routes[name]
            for backend, known in self._known.items()
            if name in known.routes and (allowed is None or backend in allowed)
        ]
        if len(found) > 1:
            found.sort(key=self._preference)
        return found

    def _preference(self, route: Route) -> tuple[bool, int, int, int]:
        """Reachable first (a backend that is down keeps its stale list, and a request sent
        there would only fail), then resident, asleep, the cheapest to bring in, config order."""
        backend = route.backend
        down = not self._known[backend].reachable
        rank = _RANK.get(self._residency.state(backend), 2)
        return down, rank, self._costs.get(backend, 2), self._order[backend]

    async def listing(self) -> list[tuple[str, Route, bool]]:
        """``(name, route, reachable)`` per name, each name once, on its preferred backend
        (after the first discovery, so a list asked for at start-up is not empty)."""
        if self._reads == 0:
            await self.refresh()
        seen: dict[str, tuple[str, Route, bool]] = {}
        for known in self._known.values():
            for name in known.routes:
                if name not in seen:
                    best = self.routes(name)[0]
                    seen[name] = (name, best, self._known[best.backend].reachable)
        return list(seen.values())

    def closest(self, name: str, among: Iterable[str] | None = None) -> list[str]:
        allowed = None if among is None else set(among)
        names = {
            n
            for b, known in self._known.items()
            if allowed is None or b in allowed
            for n in known.routes
        }
        return difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.4)

    async def resolve(self, name: str, among: Iterable[str] | None = None) -> Route:
        """The route for ``name``; raises ModelNotFound (naming the closest) when none."""
        among = None if among is None else tuple(among)
        found = self.routes(name, among)
        if not found:
            found = await self._look_again(name, among)
        if found:
            return found[0]
        near = self.closest(name, among)
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        known = "" if near else " (GET /v1/models lists every model)"
        raise ModelNotFound(f"the model {name!r} is served by no backend{hint}{known}")

    # --- refreshing ---------------------------------------------------------------------

    async def run(self) -> None:
        """Run the reads asked for, and refresh every ``modelRefresh``, until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve_reads, tg)
            while True:
                await self.refresh()
                await anyio.sleep(self._refresh_every)

    async def refresh(self) -> None:
        """Read every discovered backend's list (sharing reads under way); needs :meth:`run`."""
        reads = [self._start_read(b) for b, known in self._known.items() if known.discovered]
        for read in reads:
            await read.done.wait()
        self._reads += 1

    async def _look_again(self, name: str, among: tuple[str, ...] | None) -> list[Route]:
        """Re-read the backends not read lately and wait, bounded, for ``name`` to turn up."""
        pending = []
        for backend, known in self._known.items():
            if not known.discovered or (among is not None and backend not in among):
                continue
            if known.reading or self._clock() - known.read_at >= UNKNOWN_REFRESH_EVERY:
                pending.append(self._start_read(backend))
        while pending and not self.routes(name, among):
            left = max(r.started for r in pending) + UNKNOWN_WAIT - self._clock()
            if left <= 0:
                break
            if self._ended is None:
                self._ended = anyio.Event()
            with anyio.move_on_after(left):
                await self._ended.wait()
            pending = [r for r in pending if not r.done.is_set()]
        return self.routes(name, among)

    def _start_read(self, backend: str) -> _Read:
        """The read of ``backend`` under way, asking :meth:`run` for one if there is none."""
        known = self._known[backend]
        if known.reading is None:
            known.reading = _Read(self._clock(), anyio.Event())
            self._asked.append(backend)
            if self._wake is not None:
                self._wake.set()
        return known.reading

    async def _serve_reads(self, tg: anyio.abc.TaskGroup) -> None:
        while True:
            while self._asked:
                tg.start_soon(self._read, self._asked.popleft())
            self._wake = anyio.Event()
            await self._wake.wait()

    async def _read(self, backend: str) -> None:
        known = self._known[backend]
        try:
            await self._discover(self._by_name[backend])
        finally:
            known.read_at = self._clock()
            read, known.reading = known.reading, None
            if read is not None:
                read.done.set()
            ended, self._ended = self._ended, None
            if ended is not None:
                ended.set()

    async def _discover(self, backend: BackendConfig) -> None:
        if backend.unload_strategy in UNLISTED and not is_ollama(backend):
            return
        path = "/api/tags" if is_ollama(backend) else "/v1/models"
        known = self._known[backend.name]
        try:
            with anyio.fail_after(DISCOVERY_TIMEOUT):
                response = await self._client.get(backend.upstream + path)
            if response.status_code == 404:
                known.reachable = True
                return  # nothing to list: reachable through /proxy/ only
            response.raise_for_status()
            names = _names(response.json(), path)
        except (httpx.HTTPError, TimeoutError, ValueError) as exc:
            if known.reachable:
                kept = f"keeping its {len(known.routes)} known models" if known.routes else ""
                log.warning(
                    "%s: cannot read its model list (%s)%s",
                    backend.name,
                    str(exc) or type(exc).__name__,
                    f"; {kept}" if kept else "",
                )
            known.reachable = False
            return
        if not known.reachable:
            log.info("%s: model list readable again", backend.name)
        known.reachable = True
        known.routes = _discovered(backend.name, names, is_ollama(backend))


def _names(data: Any, path: str) -> list[str]:
    """Model names from ``/api/tags`` (``models[].name``) or ``/v1/models`` (``data[].id``)."""
    key, field = ("models", "name") if path == "/api/tags" else ("data", "id")
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"no {key!r} list in the answer")
    return [i[field] for i in items if isinstance(i, dict) and isinstance(i.get(field), str)]
