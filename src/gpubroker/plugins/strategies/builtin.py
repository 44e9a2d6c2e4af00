"""Builtin unload strategies, registered through the same hook a plugin uses.

Each follows the service's own API, as its docstring names it. The broker bounds every
call with ``unloadTimeout``, so the confirmation polls below simply poll until done.
``OllamaStrategy`` and ``ComfyUIStrategy`` live in modules of their own and are importable
from this one too.
"""

from __future__ import annotations

from typing import Any

from gpubroker.errors import StrategyFailed
from gpubroker.plugins.strategies.base import Strategy
from gpubroker.plugins.strategies.calls import POLL_INTERVAL, poll_until
from gpubroker.plugins.strategies.calls import json_call as _json
from gpubroker.plugins.strategies.comfyui import ComfyUIStrategy
from gpubroker.plugins.strategies.ollama import OllamaStrategy

__all__ = [
    "POLL_INTERVAL",
    "ComfyUIStrategy",
    "GenericStrategy",
    "OllamaStrategy",
    "VLLMStrategy",
    "poll_until",
]


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
