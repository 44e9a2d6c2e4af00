"""The words the scheduler answers in: the effects a driver carries out and what a plan did.

Plain frozen values, so the pure :mod:`~gpubroker.scheduling.scheduler` can hand them to the
broker (which runs them) and to tests (which replay them) without either importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SwapInfo:
    """What a plan did, for the ``X-GPUBroker-Swap`` header and the history."""

    target: str | None
    evicted: tuple[str, ...]
    drain_s: float
    unload_s: float
    load_s: float
    failures: tuple[str, ...] = ()
    reason: str = "request"

    @property
    def total_s(self) -> float:
        return self.drain_s + self.unload_s + self.load_s

    def header(self) -> str:
        evicted = ",".join(self.evicted) or "-"
        return f"evicted={evicted}; to={self.target or '-'}; ms={round(self.total_s * 1000)}"


@dataclass(frozen=True, slots=True)
class SwapRecord:
    """A finished swap as the broker keeps it for the status page: when (Unix time) and what."""

    at: float
    info: SwapInfo


@dataclass(frozen=True, slots=True)
class Admit:
    lease: int
    backend: str
    swap: SwapInfo | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    lease: int
    backend: str
    status: int
    code: str
    message: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class WaitIdle:
    """Poll the backend's ``busy()`` until it is idle, then report ``idle(plan, backend)``."""

    swap: int
    backend: str


@dataclass(frozen=True, slots=True)
class Unload:
    """Run the backend's strategy ``unload()``; report ``unloaded(plan, backend, error)``."""

    swap: int
    backend: str


@dataclass(frozen=True, slots=True)
class Load:
    """Run the backend's strategy ``load()``; report ``loaded(plan, backend, error)``."""

    swap: int
    backend: str


@dataclass(frozen=True, slots=True)
class CancelSwap:
    """A plan was abandoned before anything was unloaded: stop its idle waits."""

    swap: int


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth recording (history, event stream, logs)."""

    kind: str
    backend: str | None = None
    lease: int | None = None
    detail: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SwapDone:
    """A plan finished; ``info`` has its phase timings."""

    swap: int
    info: SwapInfo


Effect = Admit | Refuse | WaitIdle | Unload | Load | CancelSwap | Note | SwapDone
