"""One loop that samples the GPUs, attributes their processes and raises warnings.

Once per ``telemetryInterval``: a bounded telemetry sample (shared by everyone who asks), owners
for the GPU processes, each backend's measured VRAM handed to the scheduler, and the alert rules
run over the result. Each measurement is published as :class:`~gpubroker.events.Measured` (the
broker applies it), then the memory no backend owns as :class:`~gpubroker.events.Unmanaged`
(neither after a failed sample); warnings that appear or clear become ``warning`` /
``warning_cleared`` events. The monitor reads the scheduler but never holds the broker: the
broker takes the monitor (to confirm unloads), and the bus carries news the other way. Nothing
here blocks the event loop: psutil and NVML run in worker threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.to_thread

from gpubroker.config.model import Config
from gpubroker.events import (
    Event,
    EventBus,
    Freed,
    Measured,
    Preload,
    Unmanaged,
    WarningCleared,
    WarningRaised,
    total_held,
)
from gpubroker.observe.alerts import Alerts, Facts
from gpubroker.observe.attribution import (
    Attribution,
    attribute,
    existing,
    find_trees,
    unmanaged,
)
from gpubroker.telemetry.base import TelemetrySnapshot
from gpubroker.telemetry.sampler import Sampler, SingleFlight
from gpubroker.vram import MiB, freed_goal

if TYPE_CHECKING:
    from gpubroker.scheduling.scheduler import BackendSpec, State

log = logging.getLogger("gpubroker.observe.monitor")

TREE_TTL = 10.0  # seconds a backend's process tree is reused before psutil looks again
TREE_RETRY = 1.0  # …but a new stranger on the GPU sends it looking again after this long
FREED_POLL = 0.1  # seconds between samples while confirming an unload

Roots = Callable[[], Mapping[str, Iterable[int]]]


class SlotView(Protocol):
    @property
    def state(self) -> State: ...
    @property
    def spec(self) -> BackendSpec: ...
    @property
    def measured(self) -> Mapping[str, int]: ...


class Placement(Protocol):
    """What the alerts read of the scheduler: each backend's state and GPUs (read-only)."""

    @property
    def slots(self) -> Mapping[str, SlotView]: ...

    def backend_state(self, backend: str) -> State:
        """One state for a backend and its model units."""
        ...


class Monitor:
    """Telemetry, attribution and alerts for one broker."""

    def __init__(
        self,
        config: Config,
        placement: Placement,
        sampler: Sampler,
        bus: EventBus,
        *,
        health: Mapping[str, Mapping[str, Any]] | None = None,
        roots: Roots | None = None,
    ) -> None:
        """``health``: the prober's results (live); ``roots``: the managed workers' pids."""
        self.config = config
        self.placement = placement
        self.sampler = sampler
        self.bus = bus
        self.interval = config.telemetry_interval
        self.health: Mapping[str, Mapping[str, Any]] = health if health is not None else {}
        self.roots = roots
        self.attribution = Attribution()
        self.alerts = Alerts(config.gpu_near_full)
        self._trees: dict[str, set[int]] = {}
        self._trees_at = float("-inf")
        self._strangers: set[int] = set()  # pids no tree held when the trees were last found
        self._told_untraced: frozenset[str] = frozenset()  # the untraced backends last logged
        self._refresh = SingleFlight(self._refresh_once)
        self.preload_problems: dict[str, tuple[str, str]] = {}  # target -> (backend, why)
        bus.subscribe(self._on_event, (Freed, Preload))

    @property
    def snapshot(self) -> TelemetrySnapshot:
        return self.sampler.latest

    async def run(self) -> None:
        """Sample, attribute and evaluate every interval until cancelled."""
        while True:
            try:
                await self.refresh()
            except Exception:  # watching the GPU must never take the proxy down with it
                log.exception("telemetry refresh failed; trying again next interval")
            await anyio.sleep(self.interval)

    async def refresh(self) -> None:
        """Sample, attribute and evaluate once.

        ``run`` and ``wait_freed`` both ask: one asking while a refresh is in progress awaits
        that one rather than sampling, tracing and evaluating the same moment twice.
        """
        await self._refresh()

    async def _refresh_once(self) -> None:
        snap = await self.sampler.sample()
        if snap.error is None:  # a failed read says nothing of who holds what: keep the last
            try:
                self.attribution = await self._attribute(snap)
            except Exception as exc:  # psutil trouble must not stop the sampling
                log.warning("attribution failed: %s: %s", type(exc).__name__, exc)
            for b in self.config.backends:
                per_gpu = self.attribution.measured.get(b.name)
                if per_gpu is None:  # cannot trace it: forget any old measurement
                    per_gpu = dict.fromkeys((str(g.index) for g in snap.gpus), None)
                self.bus.publish(Measured(backend=b.name, per_gpu=per_gpu))
            settled = None if self.sampler.source.names_owners else self._strangers
            keys = [str(g.index) for g in snap.gpus]
            unowned = unmanaged(self.attribution, keys, settled=settled)
            hidden = self._untraced()
            if hidden:  # their processes look like strangers: subtracting them would count twice
                unowned = dict.fromkeys(keys, 0)
                if hidden != self._told_untraced:
                    self._told_untraced = hidden
                    log.warning(
                        "cannot see the processes of %s (another user's service, or behind a "
                        "proxy): memory no backend owns is not subtracted from capacity; run "
                        "gpubroker as that user, or as root, to count it",
                        ", ".join(sorted(hidden)),
                    )
            self.bus.publish(Unmanaged(per_gpu=unowned))
        slots, names = self.placement.slots, [b.name for b in self.config.backends]
        facts = Facts(
            now=time.time(),
            snapshot=snap,
            attribution=self.attribution,
            backends=self.config.backends,
            states={name: self.placement.backend_state(name).value for name in names},
            gpus={name: slots[name].spec.gpus for name in names},
            health=self.health,
            models={
                unit: (slot.spec.backend, slot.spec.need, sum(slot.measured.values()))
                for unit, slot in slots.items()
                if slot.spec.model is not None
                and slot.spec.source == "declared"  # the model's own vram, not its backend's
                and slot.spec.need is not None
                and slot.state.value == "resident"
                and slot.measured
            },
            split=frozenset(slot.spec.backend for slot in slots.values() if slot.spec.group),
            preload=dict(self.preload_problems),
        )
        raised, cleared = self.alerts.evaluate(facts)
        for a in raised:
            log.warning("%s: %s", a.code, a.message)
            self.bus.publish(
                WarningRaised(backend=a.backend, code=a.code, subject=a.subject, message=a.message)
            )
        for a in cleared:
            self.bus.publish(WarningCleared(backend=a.backend, code=a.code, subject=a.subject))

    def _untraced(self) -> frozenset[str]:
        """Backends that answer (their health probe says up) on a local upstream, not started
        by us, whose processes the last look could not find: on a GPU they would pass for
        processes nobody owns. A source that names owners needs no trees."""
        if self.sampler.source.names_owners or not self._trees:
            return frozenset()
        return frozenset(
            b.name
            for b in self.config.backends
            if not b.command
            and not self._trees.get(b.name)
            and (self.health.get(b.name) or {}).get("status") == "up"
        )

    async def _attribute(self, snap: TelemetrySnapshot) -> Attribution:
        names = [b.name for b in self.config.backends]
        if self.sampler.source.names_owners or not snap.gpus:
            return attribute(snap, names, {}, owners_named=self.sampler.source.names_owners)
        pids = {p.pid for g in snap.gpus for p in g.processes}
        known = set().union(*self._trees.values()) if self._trees else set()
        age = time.monotonic() - self._trees_at
        # A process no tree holds may be a worker's new child: look again, but only once per
        # stranger, so a lasting one (a desktop, a container) does not cost a /proc walk a sample.
        if age > TREE_TTL or (pids - known - self._strangers and age > TREE_RETRY):
            roots = dict(self.roots()) if self.roots else {}
            backends = self.config.backends
            self._trees = await anyio.to_thread.run_sync(find_trees, backends, roots)
            self._trees_at = time.monotonic()
            self._strangers = pids - set().union(*self._trees.values())
        visible = await anyio.to_thread.run_sync(existing, pids)
        return attribute(snap, names, self._trees, visible=visible)

    async def wait_freed(self, backend: str, limit: float) -> str | None:
        """After an unload: sample until ``backend``'s memory is back, for up to ``limit`` s.

        None when it came back, or when telemetry cannot see this backend's memory at all (then
        the service's word is all there is). Otherwise why not, for the swap's record. A sleep
        keeps the CUDA context, so "back" means down to :func:`~gpubroker.vram.freed_goal`,
        not zero.
        """
        before = self._held(backend)
        if before is None:
            return None
        goal = freed_goal(before)
        held: int | None = before
        with anyio.move_on_after(limit):
            while True:
                await self.refresh()
                held = self._held(backend)
                if held is None or held <= goal:
                    return None
                await anyio.sleep(FREED_POLL)
        return f"its memory did not come back: {(held or 0) / MiB:.0f} MiB still held after unload"

    def _held(self, backend: str) -> int | None:
        """Bytes ``backend`` held at the last sample (what the broker was told)."""
        return total_held(self.attribution.measured.get(backend))

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Preload):  # a preload that failed or was skipped is a warning
            if event.state in ("failed", "skipped"):
                why = f"{event.state}: {event.error}"
                self.preload_problems[event.target] = (event.backend or "", why)
            else:
                self.preload_problems.pop(event.target, None)
        if isinstance(event, Freed) and event.backend is not None:
            self.alerts.unloaded(event.backend, event.at, event.held if event.measured else None)

    def reconfigure(self, config: Config) -> None:
        """A reload: attribute and measure ``config``'s backends from the next sample on."""
        self.config = config
