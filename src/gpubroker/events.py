"""One event bus, and one typed event per thing that happens.

Who publishes: the broker (leases, swaps and the scheduler's notes, see ``Broker._note``), the
supervisor (managed workers) and the monitor (warnings, measurements). Who listens: the broker
itself (measurements, workers gone), metrics, the monitor's alerts and every ``/events`` reader.

Events carry Python units (seconds, bytes, the lease id as ``lease``). Only
:meth:`WireEvent.to_json` speaks the wire form that ``/events`` streams (camelCase, milliseconds,
``request`` for the lease id); subscribers read the typed fields, never that form. Events that
are not :class:`WireEvent` (:class:`Measured`, :class:`Unmanaged`, :class:`WorkerGone`) are news
between objects and never leave the process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from gpubroker.vram import MiB

log = logging.getLogger("gpubroker.events")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Anything published on the bus."""


Handler = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out: ``publish`` calls each subscriber of the event's kind in turn.

    A subscriber names the kinds it wants (classes; a base class takes its subclasses, the
    default :class:`Event` takes everything), so the lease path, which publishes a few events
    per request, calls only those who asked. A subscriber must not block (SSE feeds buffer,
    metrics count); one that raises is logged and the others still get the event, so a bad
    listener never breaks the publisher.
    """

    def __init__(self) -> None:
        self._subscribers: list[tuple[Handler, tuple[type[Event], ...]]] = []
        self._by_type: dict[type[Event], tuple[Handler, ...]] = {}  # built on first publish

    def subscribe(
        self, handler: Handler, kinds: tuple[type[Event], ...] = ()
    ) -> Callable[[], None]:
        """Call ``handler`` with every event of ``kinds`` (all events when empty) from now on;
        returns the unsubscribe."""
        entry = (handler, kinds or (Event,))
        self._subscribers.append(entry)
        self._by_type.clear()

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)
                self._by_type.clear()

        return unsubscribe

    def _handlers(self, kind: type[Event]) -> tuple[Handler, ...]:
        handlers = self._by_type.get(kind)
        if handlers is None:
            handlers = self._by_type[kind] = tuple(
                h for h, kinds in self._subscribers if issubclass(kind, kinds)
            )
        return handlers

    def wants(self, kind: type[Event]) -> bool:
        """Whether an event of ``kind`` would reach anyone (a subscriber, or the debug log):
        a publisher may skip building one that would not."""
        if self._handlers(kind):
            return True
        return issubclass(kind, WireEvent) and log.isEnabledFor(logging.DEBUG)

    def publish(self, event: Event) -> None:
        kind = type(event)
        handlers = self._handlers(kind)
        if isinstance(event, WireEvent):  # news between objects (a sample's Measured) stays quiet
            log.debug("%s", event)
        for handler in handlers:
            try:
                handler(event)
            except Exception:
                log.exception("an event subscriber failed on %s", kind.__name__)

    def __len__(self) -> int:
        """How many subscribers there are (tests wait on SSE readers coming and going)."""
        return len(self._subscribers)


def on_wire(handler: Callable[[dict[str, Any]], None]) -> Handler:
    """A subscriber that hands ``handler`` each event as ``/events`` would send it."""

    def wire(event: Event) -> None:
        if isinstance(event, WireEvent):
            handler(event.to_json())

    return wire


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class WireEvent(Event):
    """An event ``/events`` streams. ``elapsed``: seconds since the lease arrived, or since
    the swap began (set by the broker where it knows them). ``model``: the model the lease
    asked for, or the model unit of the backend a swap step is about, where there is one; on
    the wire only when set, so an event without one is sent as it always was."""

    kind: ClassVar[str]
    backend: str | None
    at: float = field(default_factory=time.time)
    lease: int | None = None
    elapsed: float | None = None
    model: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The wire form: ``event``, ``backend``, ``at``, ``request`` and ``elapsedMs`` where
        known, then the kind's own fields, then ``model`` where set."""
        out: dict[str, Any] = {"event": self.kind, "backend": self.backend, "at": self.at}
        if self.lease is not None:
            out["request"] = self.lease
        if self.elapsed is not None:
            out["elapsedMs"] = _ms(self.elapsed)
        out.update(self.detail())
        if self.model is not None:
            out["model"] = self.model
        return out

    def detail(self) -> dict[str, Any]:
        return {}


# --- leases ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseStep(WireEvent):
    """A step of one lease: who asked (``caller``: an API key's name, the client's own name for
    itself, or its address), on the wire only when set."""

    caller: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = WireEvent.to_json(self)
        model = out.pop("model", None)  # caller, then model: last, as they always came
        if self.caller is not None:
            out["caller"] = self.caller
        if model is not None:
            out["model"] = model
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Queued(LeaseStep):
    kind: ClassVar[str] = "queued"
    position: int

    def detail(self) -> dict[str, Any]:
        return {"position": self.position}


@dataclass(frozen=True, slots=True, kw_only=True)
class Admitted(LeaseStep):
    kind: ClassVar[str] = "admitted"
    queued: float  # seconds from arrival to admission

    def detail(self) -> dict[str, Any]:
        return {"queueMs": _ms(self.queued)}


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRefused(LeaseStep):
    kind: ClassVar[str] = "refused"
    status: int
    reason: str  # the refusal's code

    def detail(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason}


@dataclass(frozen=True, slots=True, kw_only=True)
class FirstByte(WireEvent):
    kind: ClassVar[str] = "first_byte"


@dataclass(frozen=True, slots=True, kw_only=True)
class Released(LeaseStep):
    kind: ClassVar[str] = "released"


@dataclass(frozen=True, slots=True, kw_only=True)
class Left(LeaseStep):
    """A queued lease went away (its client left) before it was admitted."""

    kind: ClassVar[str] = "left"


@dataclass(frozen=True, slots=True, kw_only=True)
class Jobs(WireEvent):
    """The service's own queue (ComfyUI's) changed size."""

    kind: ClassVar[str] = "jobs"
    count: int
    running: int
    pending: int

    def detail(self) -> dict[str, Any]:
        return {"count": self.count, "running": self.running, "pending": self.pending}


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerShuttingDown(WireEvent):
    kind: ClassVar[str] = "shutting_down"
    backend: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Reconciled(WireEvent):
    kind: ClassVar[str] = "reconciled"
    state: str

    def detail(self) -> dict[str, Any]:
        return {"state": self.state}


# --- swaps ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _SwapStep(WireEvent):
    swap: int

    def detail(self) -> dict[str, Any]:
        return {"swap": self.swap}


@dataclass(frozen=True, slots=True, kw_only=True)
class SwapStarted(_SwapStep):
    kind: ClassVar[str] = "swap_started"
    victims: tuple[str, ...]  # units: a backend, or ``backend/model``
    requests: tuple[int, ...]  # the leases queued for the target as it began
    reason: str = "request"  # why: a request, admin, idle, unmanaged (memory nobody owns grew)

    def detail(self) -> dict[str, Any]:
        return {
            "victims": list(self.victims),
            "swap": self.swap,
            "requests": list(self.requests),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Draining(_SwapStep):
    kind: ClassVar[str] = "draining"
    active: int

    def detail(self) -> dict[str, Any]:
        return {"active": self.active, "swap": self.swap}


@dataclass(frozen=True, slots=True, kw_only=True)
class Unloading(_SwapStep):
    kind: ClassVar[str] = "unloading"


@dataclass(frozen=True, slots=True, kw_only=True)
class Sleeping(_SwapStep):
    """An unload that puts the service to sleep (it keeps its CUDA context)."""

    kind: ClassVar[str] = "sleeping"


@dataclass(frozen=True, slots=True, kw_only=True)
class Freed(_SwapStep):
    kind: ClassVar[str] = "freed"
    holding: bool
    measured: bool  # ``held`` is what telemetry saw, not the declared size
    held: int | None  # bytes it held as the unload began

    def detail(self) -> dict[str, Any]:
        mib = None if self.held is None else round(self.held / MiB)
        return {"swap": self.swap, "holding": self.holding, "measured": self.measured, "mib": mib}


@dataclass(frozen=True, slots=True, kw_only=True)
class UnloadFailed(_SwapStep):
    kind: ClassVar[str] = "unload_failed"
    error: str
    holding: bool

    def detail(self) -> dict[str, Any]:
        return {"error": self.error, "swap": self.swap, "holding": self.holding}


@dataclass(frozen=True, slots=True, kw_only=True)
class Loading(_SwapStep):
    kind: ClassVar[str] = "loading"


@dataclass(frozen=True, slots=True, kw_only=True)
class Waking(_SwapStep):
    """A load that wakes a sleeping service."""

    kind: ClassVar[str] = "waking"


@dataclass(frozen=True, slots=True, kw_only=True)
class SwapLoadFailed(_SwapStep):
    kind: ClassVar[str] = "load_failed"
    error: str | None

    def detail(self) -> dict[str, Any]:
        return {"error": self.error, "swap": self.swap}


@dataclass(frozen=True, slots=True, kw_only=True)
class SwapFailed(_SwapStep):
    kind: ClassVar[str] = "swap_failed"
    failures: tuple[str, ...]

    def detail(self) -> dict[str, Any]:
        return {"swap": self.swap, "failures": list(self.failures)}


@dataclass(frozen=True, slots=True, kw_only=True)
class SwapAbandoned(_SwapStep):
    kind: ClassVar[str] = "swap_abandoned"


@dataclass(frozen=True, slots=True, kw_only=True)
class Swapped(_SwapStep):
    """A swap that evicted something finished; phases in seconds."""

    kind: ClassVar[str] = "swapped"
    evicted: tuple[str, ...]
    drain: float
    unload: float
    load: float
    total: float

    def detail(self) -> dict[str, Any]:
        return {
            "evicted": list(self.evicted),
            "total_ms": _ms(self.total),  # the first spelling: scripts written for it read it
            "swap": self.swap,
            "drainMs": _ms(self.drain),
            "unloadMs": _ms(self.unload),
            "loadMs": _ms(self.load),
            "totalMs": _ms(self.total),
        }


# --- warnings -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WarningRaised(WireEvent):
    kind: ClassVar[str] = "warning"
    code: str
    subject: str
    message: str

    def detail(self) -> dict[str, Any]:
        return {"code": self.code, "subject": self.subject, "message": self.message}


@dataclass(frozen=True, slots=True, kw_only=True)
class WarningCleared(WireEvent):
    kind: ClassVar[str] = "warning_cleared"
    code: str
    subject: str

    def detail(self) -> dict[str, Any]:
        return {"code": self.code, "subject": self.subject}


# --- the config ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigReloaded(WireEvent):
    """A reload applied the config file again (``gpubroker reload``, SIGHUP, a watched edit):
    the backends added, removed and changed, and the keys that wait for a restart. A reload
    that failed changes nothing and raises a ``config_reload_failed`` warning instead."""

    kind: ClassVar[str] = "config_reloaded"
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    summary: str = ""  # one line, as the log and ``gpubroker reload`` say it

    def detail(self) -> dict[str, Any]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "needsRestart": list(self.restart),
            "summary": self.summary,
        }


# --- managed workers (anyone may read these: a state and why, never output nor argv) ---------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStarting(WireEvent):
    kind: ClassVar[str] = "worker_starting"
    pid: int

    def detail(self) -> dict[str, Any]:
        return {"pid": self.pid}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerProgress(WireEvent):
    """Still waiting for a starting worker's health check, ``waited`` seconds in."""

    kind: ClassVar[str] = "worker_progress"
    waited: float

    def detail(self) -> dict[str, Any]:
        return {"elapsedMs": round(self.waited * 1000)}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReady(WireEvent):
    kind: ClassVar[str] = "worker_ready"
    pid: int | None
    took: float  # seconds from start to ready

    def detail(self) -> dict[str, Any]:
        return {"pid": self.pid, "startMs": _ms(self.took)}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerAdopted(WireEvent):
    kind: ClassVar[str] = "worker_adopted"
    pid: int

    def detail(self) -> dict[str, Any]:
        return {"pid": self.pid}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerFailed(WireEvent):
    kind: ClassVar[str] = "worker_failed"
    error: str

    def detail(self) -> dict[str, Any]:
        return {"error": self.error}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerExited(WireEvent):
    kind: ClassVar[str] = "worker_exited"
    code: int | None

    def detail(self) -> dict[str, Any]:
        return {"code": self.code}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerCrashed(WireEvent):
    kind: ClassVar[str] = "worker_crashed"
    code: int | None
    restart_in: float  # seconds until the next start

    def detail(self) -> dict[str, Any]:
        return {"code": self.code, "restartIn": self.restart_in}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStopping(WireEvent):
    kind: ClassVar[str] = "worker_stopping"
    pid: int

    def detail(self) -> dict[str, Any]:
        return {"pid": self.pid}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStopped(WireEvent):
    """``report``: the stop's report as the admin API returns it (already wire-shaped)."""

    kind: ClassVar[str] = "worker_stopped"
    report: Mapping[str, Any]

    def detail(self) -> dict[str, Any]:
        return dict(self.report)


# --- preload ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Preload(WireEvent):
    """A step of the start-up ``preload:``: ``target`` (a backend, or ``backend/model``) is
    ``pending``, ``loading``, ``done``, ``skipped`` (it did not fit beside what is resident)
    or ``failed`` (``error`` says why)."""

    kind: ClassVar[str] = "preload"
    target: str
    state: str
    error: str | None = None

    def detail(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "state": self.state}
        if self.error is not None:
            out["error"] = self.error
        return out


# --- the stream itself ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Dropped(WireEvent):
    """Told to one ``/events`` reader that fell behind: ``count`` events it never got."""

    kind: ClassVar[str] = "dropped"
    backend: str | None = None
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"event": self.kind, "count": self.count, "at": self.at}


# --- news between objects, never on the wire ------------------------------------------------


def total_held(per_gpu: Mapping[str, int | None] | None) -> int | None:
    """Bytes held over all GPUs; None when nothing was measured or any GPU cannot tell."""
    if not per_gpu or any(v is None for v in per_gpu.values()):
        return None
    return sum(v or 0 for v in per_gpu.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class Measured(Event):
    """Telemetry's bytes held by ``backend`` per GPU index (None: that GPU cannot tell)."""

    backend: str
    per_gpu: Mapping[str, int | None]

    @property
    def total(self) -> int | None:
        return total_held(self.per_gpu)


@dataclass(frozen=True, slots=True, kw_only=True)
class Unmanaged(Event):
    """Bytes per GPU key held by processes no backend owns (0 on a GPU with none), at one sample.

    Published by the monitor after each sample's :class:`Measured`, every GPU of the sample
    present; never after a failed sample. What counts is
    :func:`gpubroker.observe.attribution.unmanaged`. Like :class:`Measured` it comes every
    ``telemetryInterval`` and stays off ``/events``: the ``unmanaged_gpu_process`` warning is
    what a reader is told.
    """

    per_gpu: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.per_gpu.values())


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerGone(Event):
    """A managed worker ended unasked and will not come back by itself (exit 0 under
    ``on-failure``, ``never``, a crash loop): the scheduler should stop counting it."""

    backend: str


WIRE_KINDS: tuple[type[WireEvent], ...] = (
    Queued,
    Admitted,
    LeaseRefused,
    FirstByte,
    Released,
    Left,
    Jobs,
    BrokerShuttingDown,
    Reconciled,
    SwapStarted,
    Draining,
    Unloading,
    Sleeping,
    Freed,
    UnloadFailed,
    Loading,
    Waking,
    SwapLoadFailed,
    SwapFailed,
    SwapAbandoned,
    Swapped,
    WarningRaised,
    WarningCleared,
    ConfigReloaded,
    WorkerStarting,
    WorkerProgress,
    WorkerReady,
    WorkerAdopted,
    WorkerFailed,
    WorkerExited,
    WorkerCrashed,
    WorkerStopping,
    WorkerStopped,
    Preload,
    Dropped,
)
