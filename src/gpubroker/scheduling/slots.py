"""What the scheduler keeps: a unit's spec and state, a queued request, a plan in progress.

Plain records, no decisions: :mod:`~gpubroker.scheduling.scheduler` decides with them,
:mod:`~gpubroker.scheduling.waitqueue` and :mod:`~gpubroker.scheduling.unitindex` index them.
Kept apart so those modules share them without importing the scheduler.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gpubroker.scheduling.victims import Candidate

Chooser = Callable[[int, Sequence[Candidate], float], list[str] | None]
"""Which candidates free ``shortfall`` bytes (given the time now), or None: the victim rule."""
Source = Literal["declared", "backend", "measured", "unknown"]
"""Where a unit's own footprint comes from: its config (``declared``), its backend's ``vram``
standing in for a model's (``backend``), an earlier measurement (``measured``), or nowhere."""


class State(enum.Enum):
    UNKNOWN = "unknown"  # may hold VRAM; we could not tell at start-up
    ABSENT = "absent"
    ASLEEP = "asleep"  # freed its VRAM by sleeping; wakes faster than a cold load
    LOADING = "loading"
    RESIDENT = "resident"
    DRAINING = "draining"  # victim of a plan: no new leases, waiting for in-flight ones
    UNLOADING = "unloading"


HOLDS_VRAM = frozenset(
    {State.UNKNOWN, State.LOADING, State.RESIDENT, State.DRAINING, State.UNLOADING}
)
# The state a backend shows when its units differ: the first of these any of them is in.
SHOWN_ORDER = (
    State.LOADING,
    State.UNLOADING,
    State.DRAINING,
    State.RESIDENT,
    State.UNKNOWN,
    State.ASLEEP,
    State.ABSENT,
)


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """What the scheduler knows of a unit. ``need`` in bytes per GPU; None = unknown (the
    whole GPU until a request or telemetry tells more); ``source`` says where it came from.

    ``cost`` ranks how cheap the unit is to evict and bring back: 1 (vLLM, which wakes in
    seconds), 2 (a cold load), 3 (a process to restart). ``sleeps`` says what its unload does
    and so what state follows (asleep rather than absent): a different fact, not inferred from
    the rank. ``group`` and ``model``: the backend and model of a model unit (empty for a
    backend's own unit). ``exclusive``: units, or backends (all their units), never resident
    together with this one.
    """

    name: str
    gpus: tuple[str, ...] = ("0",)
    need: int | None = None
    priority: int = 0
    pinned: bool = False
    max_concurrency: int | None = None
    cost: int = 2
    idle_timeout: float | None = None
    sleeps: bool = False  # its unload is a sleep: afterwards it is asleep, not absent
    group: str = ""
    model: str | None = None
    exclusive: frozenset[str] = frozenset()
    source: Source = "declared"

    @property
    def backend(self) -> str:
        """The backend this unit belongs to (itself for a backend's own unit)."""
        return self.group or self.name


@dataclass(slots=True)
class Slot:
    spec: BackendSpec
    state: State = State.UNKNOWN
    active: set[int] = field(default_factory=set)
    last_used: float = 0.0
    loaded_at: float = float("-inf")
    plan: int | None = None  # the plan this backend is a victim or target of
    measured: dict[str, int] = field(default_factory=dict)  # GPU -> bytes telemetry saw held
    jobs: int = 0  # work the service accepted and runs after its HTTP call ended (ComfyUI)
    estimate: int | None = None  # the most its admitted requests asked for since it loaded

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def busy(self) -> int:
        """GPU work in flight: leases held plus the service's own queued and running jobs."""
        return len(self.active) + self.jobs

    @property
    def has_room(self) -> bool:
        limit = self.spec.max_concurrency
        return limit is None or self.busy < limit


@dataclass(slots=True)
class Waiter:
    """A queued request. ``backend`` is its unit; ``need``: bytes it asks its unit to hold
    (None: the unit's footprint); ``fresh``: what it would need were its unit freed first
    (a ComfyUI cache), where that is less; ``seq``: its place in arrival order, given by the
    queue (``since`` may tie, and a clock handed in need not be monotonic)."""

    lease: int
    backend: str
    since: float
    need: int | None = None
    fresh: int | None = None
    seq: int = 0


@dataclass(slots=True)
class Plan:
    id: int
    target: str | None
    victims: list[str]
    gpus: frozenset[str]
    started: float
    reason: str = "request"
    force: bool = False
    asked: set[str] = field(default_factory=set)  # victims sent to the idle check
    idle: set[str] = field(default_factory=set)  # victims whose busy() said idle
    gone: set[str] = field(default_factory=set)  # victims unloaded (or failed trying)
    failures: list[str] = field(default_factory=list)
    prior: dict[str, State] = field(default_factory=dict)  # victims' states before the drain
    drained_at: float | None = None
    unloaded_at: float | None = None
    unload_started: bool = False
