"""ComfyUI's strategy: ``/free`` to unload, its queue as in-flight work, workflows sized by file.

Pinned to Comfy-Org/ComfyUI a125cd84b054 (2025-10-12); file: function named at each use.
"""

from __future__ import annotations

import json
import logging
from typing import Literal

import anyio

from gpubroker.plugins.strategies.base import Demand, Job, Strategy, StrategyContext
from gpubroker.plugins.strategies.calls import json_call as _json
from gpubroker.plugins.strategies.calls import poll_until
from gpubroker.plugins.strategies.comfy_models import workflow_models
from gpubroker.vram import GiB, MiB, freed_goal

log = logging.getLogger("gpubroker.plugins.strategies")

# comfy/model_management.py minimum_inference_memory: 0.8 GiB, plus EXTRA_RESERVED_VRAM (400 MiB
# on Linux) — what ComfyUI keeps free for sampling beside the weights it loads.
WORKING_MEMORY = int(0.8 * GiB) + 400 * MiB

PROMPT_PATHS = frozenset({"/prompt", "/api/prompt"})
"""server.py ``post_prompt`` is routed at /prompt and, as every route, again under /api
(``PromptServer.add_routes``); ComfyUI's own frontend posts to /api/prompt."""
THREAD_PARSE = 64 * 1024
"""Bodies larger than this are parsed on a worker thread, not on the event loop (a prompt
from the web UI carries the whole UI workflow in ``extra_data.extra_pnginfo``)."""


def prompt_parts(body: bytes) -> tuple[str, ...] | None:
    """The model files the workflow of a /prompt body names; None when the body is not a JSON
    object with a ``prompt`` object (ComfyUI answers 400 to such a body: no job runs).
    Never raises."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    prompt = data.get("prompt") if isinstance(data, dict) else None
    return workflow_models(prompt) if isinstance(prompt, dict) else None


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

    async def demand(self, method: str, path: str, body: bytes) -> Demand | None:
        """A queued prompt asks for the model files its loader nodes name (``parts``), and
        ComfyUI's working memory beside them (``need``); each file's bytes the broker declares
        or learns. Other requests: None."""
        if method.upper() != "POST" or path.split("?", 1)[0] not in PROMPT_PATHS:
            return None
        if len(body) > THREAD_PARSE:
            parts = await anyio.to_thread.run_sync(prompt_parts, body)
        else:
            parts = prompt_parts(body)
        if parts is None:
            return None
        return Demand(parts=parts, need=WORKING_MEMORY if parts else None)
