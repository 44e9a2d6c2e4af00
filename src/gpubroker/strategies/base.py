"""What an unload strategy is: the object that frees (and brings back) one backend's VRAM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import httpx

from ..config import BackendConfig

if TYPE_CHECKING:
    from ..supervisor import Supervisor


@dataclass(frozen=True, slots=True)
class StrategyContext:
    """What gpubroker hands a strategy when it creates one for a backend.

    ``client`` is an httpx client whose ``base_url`` is the backend's upstream, with sane
    timeouts; the strategy must not close it. The broker bounds every call with
    ``unload_timeout`` itself, so a strategy need not (but may) add its own deadlines.
    """

    backend: BackendConfig
    client: httpx.AsyncClient
    unload_timeout: float
    supervisor: Supervisor | None = None
    """The managed workers' supervisor (``command:`` backends); None where there is none."""


class Strategy:
    """Base class for unload strategies; subclass it, set ``name`` and override what you can.

    Every method is a coroutine and may raise: the broker records the error and goes on. None is
    called concurrently with another for the same backend.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    eviction_cost: ClassVar[int] = 2
    """How dear it is to evict and bring back: 1 sleeps (wakes in seconds), 2 unloads (a cold
    load), 3 stops a process. The budget scheduler evicts the cheapest first."""

    def __init__(self, ctx: StrategyContext) -> None:
        self.ctx = ctx
        self.backend = ctx.backend
        self.client = ctx.client

    async def unload(self) -> None:
        """Free this backend's VRAM and return only once it is free (or raise)."""

    async def load(self) -> None:
        """Make the backend ready before requests are forwarded (wake, preload); may no-op."""

    async def resident(self) -> bool | None:
        """Does the backend hold VRAM now? ``None`` when it cannot tell (the default)."""
        return None

    async def busy(self) -> bool:
        """Is GPU work still running after its HTTP calls ended (e.g. ComfyUI's queue)?"""
        return False
