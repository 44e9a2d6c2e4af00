"""Builtin unload strategies, registered through the same hook a plugin uses.

Each follows the service's own API as documented in shared/BACKENDS.md. The broker bounds every
call with ``unloadTimeout``, so the confirmation polls below simply poll until done.
``OllamaStrategy`` lives in :mod:`~gpubroker.plugins.strategies.ollama` (it uses the helpers
here) and is importable from this module too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import anyio
import httpx

from gpubroker.errors import StrategyFailed
from gpubroker.plugins.strategies.base import FIRST_POLL, Job, Strategy, StrategyContext
from gpubroker.vram import freed_goal

if TYPE_CHECKING:
    from gpubroker.plugins.strategies.ollama import OllamaStrategy  # noqa: F401 (re-export)

log = logging.getLogger("gpubroker.plugins.strategies")

POLL_INTERVAL = 0.02  # seconds between confirmation polls at most: a swap waits on them


async def poll_until(done: Callable[[], Awaitable[bool]]) -> None:
    """Check ``done`` now and again until it is true, soon at first, then every POLL_INTERVAL.

    A confirmation poll is what a swap waits on beyond the service's own work, so its gap is
    the swap's overhead; the broker bounds the whole wait with its own timeout.
    """
    delay = FIRST_POLL
    while not await done():
        await anyio.sleep(delay)
        delay = min(delay * 2, POLL_INTERVAL)


async def _json(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> Any:
    response = await client.request(method, url, **kwargs)
    if response.status_code >= 400:
        raise StrategyFailed(
            f"{method} {url} answered {response.status_code}: {response.text[:200]}"
        )
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise StrategyFailed(f"{method} {url} answered non-JSON: {response.text[:200]}") from None


# ComfyUI's comfy/model_management.py get_total_memory(dev, torch_total_too=True): on these
# device types ``torch_vram_total`` is torch's reserved bytes (memory_stats
# 'reserved_bytes.all.current'); on cpu and mps it is total system RAM (psutil), and under
# DirectML (device type privateuseone) a constant 1 GiB. Only the former can confirm a /free.
RESERVED_BYTES_DEVICES = frozenset({"cuda", "xpu", "npu", "mlu"})


class ComfyUIStrategy(Strategy):
    """``POST /free`` (unload models, free memory); its queue, from ``GET /queue``, is in flight.

    ComfyUI's ``/prompt`` returns before the job runs, so the jobs in its queue count as the
    backend's in-flight work (see :meth:`Strategy.jobs`) and a victim drains until the queue is
    empty. ``/free`` only sets flags that ComfyUI's worker applies once idle, so on devices
    where ``/system_stats`` reports torch's reserved VRAM we confirm it went down; elsewhere
    (CPU, Apple MPS, DirectML) nothing there measures VRAM, so we say so once and leave the
    confirmation to telemetry.
    """

    name = "comfyui"
    description = "ComfyUI: POST /free, its /queue counts as in flight, confirmed by /system_stats"

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self._told: str | None = None  # the device type we already said cannot confirm
        self._jobs: list[Job] = []  # the queue as last read

    async def _reserved(self) -> int | None:
        """Torch's reserved bytes on ComfyUI's device, or None where it does not report them."""
        stats = await _json(self.client, "GET", "/system_stats")
        devices = (stats or {}).get("devices") or []
        device = devices[0] if devices and isinstance(devices[0], dict) else {}
        kind = str(device.get("type", ""))
        if kind not in RESERVED_BYTES_DEVICES or "torch_vram_total" not in device:
            if self._told != kind:
                self._told = kind
                log.info(
                    "%s: ComfyUI runs on device type %r, where /system_stats does not report "
                    "VRAM held; unloads are confirmed by telemetry only",
                    self.backend.name,
                    kind or "unknown",
                )
            return None
        return int(device["torch_vram_total"])

    async def unload(self) -> None:
        before = await self._reserved()
        await _json(self.client, "POST", "/free", json={"unload_models": True, "free_memory": True})
        if not before:
            return
        goal = freed_goal(before)

        async def freed() -> bool:
            now = await self._reserved()
            return now is None or now <= goal

        await poll_until(freed)

    async def jobs(self) -> list[Job]:
        # server.py get_prompt: {"exec_info": {"queue_remaining": n}}, a few bytes, where
        # GET /queue (get_queue) carries every prompt in full, UI workflow included: read the
        # count each time and the list only when the count changed.
        info = await _json(self.client, "GET", "/prompt") or {}
        remaining = (info.get("exec_info") or {}).get("queue_remaining")
        if remaining == 0:
            self._jobs = []
        elif not isinstance(remaining, int) or remaining != len(self._jobs):
            self._jobs = await self._queue()
        return list(self._jobs)

    async def _queue(self) -> list[Job]:
        # server.py get_queue: {"queue_running": [...], "queue_pending": [...]}, each item
        # (number, prompt_id, prompt, extra_data, outputs_to_execute). ComfyUI stamps no time
        # on a job, so ``since`` is left to the broker (when it first saw the job).
        queue = await _json(self.client, "GET", "/queue") or {}
        out: list[Job] = []
        states: tuple[tuple[str, Literal["running", "pending"]], ...] = (
            ("queue_running", "running"),
            ("queue_pending", "pending"),
        )
        for key, state in states:
            for item in queue.get(key) or []:
                if isinstance(item, list) and len(item) >= 2:
                    out.append(Job(str(item[1]), state, url="/prompt"))
        return out

    async def resident(self) -> bool | None:
        reserved = await self._reserved()
        return None if reserved is None else reserved > 0


class VLLMStrategy(Strategy):
    """Sleep (level 1 by default, ``sleepLevel: 2`` to drop weights too) and wake before use.

    vLLM must never sleep with requests in flight (the broker drains first) and must be awake
    before anything is forwarded: ``load()`` wakes it, level 2 in the order weights →
    ``reload_weights`` → kv_cache, since a plain wake after level 2 serves garbage.

    ``/sleep`` defaults to ``mode=abort`` (vllm/entrypoints/serve/dev/sleep/api_router.py),
    which cuts whatever runs that the broker did not see (a client talking to vLLM directly,
    a ``/v1/realtime`` WebSocket); we ask ``mode=wait`` so vLLM drains those itself. Versions
    before the mode parameter ignore it. A request that reaches a sleeping vLLM is not refused
    but queued until the wake (v1/engine/core.py: pause_scheduler), so a missed wake hangs.
    Without ``--enable-sleep-mode`` a sleep frees nothing yet ``/is_sleeping`` says true: only
    the broker's telemetry check after the unload can tell.
    """

    name = "vllm"
    description = "vLLM: POST /sleep?level=N, wake with /wake_up (dev mode + --enable-sleep-mode)"
    frees_by = "sleep"
    eviction_cost = 1

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.client.request(method, path, **kwargs)
        if response.status_code == 404:
            raise StrategyFailed(
                f"vLLM answered 404 to {method} {path}: its sleep endpoints exist only when it "
                "runs with VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode"
            )
        if response.status_code >= 400:
            raise StrategyFailed(f"{method} {path} answered {response.status_code}")
        return response.json() if response.content else None

    async def _sleeping(self) -> bool:
        return bool((await self._call("GET", "/is_sleeping") or {}).get("is_sleeping"))

    async def unload(self) -> None:
        params = {"level": self.backend.sleep_level, "mode": "wait"}
        await self._call("POST", "/sleep", params=params)
        await poll_until(self._sleeping)

    async def load(self) -> None:
        if not await self._sleeping():
            return
        if self.backend.sleep_level == 2:
            await self._call("POST", "/wake_up", params={"tags": "weights"})
            await self._call("POST", "/collective_rpc", json={"method": "reload_weights"})
            await self._call("POST", "/wake_up", params={"tags": "kv_cache"})
        else:
            await self._call("POST", "/wake_up")

        async def awake() -> bool:
            return not await self._sleeping()

        await poll_until(awake)

    async def resident(self) -> bool | None:
        try:
            return not await self._sleeping()
        except StrategyFailed:
            return None


class GenericStrategy(Strategy):
    """``POST unloadEndpoint`` to free, ``POST loadEndpoint`` to preload; no-op when unset."""

    name = "generic"
    description = "Any service: POST unloadEndpoint / loadEndpoint when configured"

    async def unload(self) -> None:
        if self.backend.unload_endpoint:
            await _json(self.client, "POST", self.backend.unload_endpoint)

    async def load(self) -> None:
        if self.backend.load_endpoint:
            await _json(self.client, "POST", self.backend.load_endpoint)


def __getattr__(name: str) -> Any:
    # strategies/ollama.py imports the helpers above, so it cannot be imported from the top of
    # this module; it is handed out on first use instead (PEP 562).
    if name == "OllamaStrategy":
        from gpubroker.plugins.strategies.ollama import OllamaStrategy

        return OllamaStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
