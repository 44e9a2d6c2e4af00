"""What an unload strategy is: the object that frees (and brings back) one backend's VRAM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import httpx

from gpubroker.config.model import BackendConfig

if TYPE_CHECKING:
    from gpubroker.workers.supervisor import Supervisor

# The first re-check of a state a service is asked to change (busy, unloaded) comes this soon;
# the gap then doubles up to the caller's ceiling. Shared by the broker and the strategies.
FIRST_POLL = 0.005


@dataclass(frozen=True, slots=True)
class Job:
    """One job in a service's own queue (a ComfyUI prompt): GPU work after its HTTP call ended.

    ``since``: when the service accepted it (Unix seconds), None when the service does not say
    (the broker then keeps when it first saw it). ``method`` and ``url``: the request that
    queues such jobs, for the status page.
    """

    id: str
    state: Literal["running", "pending"]
    since: float | None = None
    method: str = "POST"
    url: str = ""


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
    gpu_memory: int | None = None
    """Total bytes of the GPUs the backend runs on, where known (telemetry or ``gpus:``):
    some services size their defaults by it (Ollama's context length)."""


@dataclass(frozen=True, slots=True)
class Demand:
    """What one GPU request asks of its backend's memory, as its strategy reads the body.

    ``model``: the model it names, as the service knows it (Ollama: ``llama3:latest``).
    ``need``: bytes that model needs on the GPU for *this* request (weights and the KV cache
    at its context size); with ``parts``, what it needs beyond those files (working memory).
    None: unknown. ``parts``: the model files it loads (a ComfyUI workflow's checkpoints,
    UNet, CLIP, VAE, LoRA files), each with a footprint of its own.
    """

    model: str | None = None
    need: int | None = None
    parts: tuple[str, ...] = ()


class Strategy:
    """Base class for unload strategies; subclass it, set ``name`` and override what you can.

    Every method is a coroutine and may raise: the broker records the error and goes on. None is
    called concurrently with another for the same backend, except :meth:`jobs`, a read that
    may run beside the others (never beside itself).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    host_header: ClassVar[Literal["client", "upstream"]] = "client"
    """The Host the proxy sends when the backend's config does not say (``hostHeader``):
    the client's, as a transparent proxy does, or the upstream's own for a service that
    refuses Host names it does not know."""
    frees_by: ClassVar[Literal["sleep", "unload", "stop"]] = "unload"
    """How ``unload()`` frees the VRAM: ``sleep`` keeps the service up with its weights off
    the GPU (it is reported asleep and woken by ``load()``), ``unload`` drops the model,
    ``stop`` ends the process. Separate from :attr:`eviction_cost`, which only ranks."""
    eviction_cost: ClassVar[int] = 2
    """How dear it is to evict and bring back: 1 sleeps (wakes in seconds), 2 unloads (a cold
    load), 3 stops a process. The budget scheduler evicts the cheapest first."""

    per_model: ClassVar[bool] = False
    """Whether the service loads and frees models one by one (Ollama): under the budget
    policy each model is then a unit of its own, freed by :meth:`unload_model`."""

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
        jobs = await self.jobs()
        return bool(jobs)

    async def jobs(self) -> list[Job] | None:
        """The service's own queue of accepted work, for a service whose requests return
        before the work runs (ComfyUI's ``/prompt``). None: it has no such queue (default).

        A strategy that overrides this makes those jobs count as in-flight work of the
        backend, exactly like leases: toward the owner's hold, the drain, ``maxConcurrency``
        and the status. The broker asks after each GPU request and then every
        ``JOB_POLL`` seconds while any remain.
        """
        return None

    async def demand(self, method: str, path: str, body: bytes) -> Demand | None:
        """What a GPU request asks of memory, read from its body (at most ``apiBodyLimit``
        bytes; empty when it has none). None: nothing to tell (the default), as for a body
        that cannot be read: this must not raise for bad input. Bounded by the broker."""
        return None

    @property
    def reads_demand(self) -> bool:
        """Whether this strategy reads requests' demands (overrides :meth:`demand`)."""
        return type(self).demand is not Strategy.demand

    def model_key(self, name: str) -> str:
        """The name the service knows a model by (Ollama adds ``:latest`` to a bare name), so
        a declared model and a request's name meet on one unit."""
        return name

    async def unload_model(self, model: str) -> None:
        """Free one model's memory and return once it is free (``per_model`` strategies)."""
        raise NotImplementedError(f"{type(self).__name__} does not free models one by one")

    async def load_model(self, model: str) -> None:
        """Make one model ready; may no-op (Ollama loads a model on its first request)."""

    async def loaded_models(self) -> dict[str, int] | None:
        """Each loaded model's bytes on the GPU (Ollama's ``/api/ps``); None: cannot tell."""
        return None


def tracks_jobs(strategy: Strategy) -> bool:
    """Whether ``strategy`` reports a queue of its own (overrides :meth:`Strategy.jobs`)."""
    return type(strategy).jobs is not Strategy.jobs
