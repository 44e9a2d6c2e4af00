"""The ComfyUI emulator's model memory over real HTTP and WebSocket (sim/comfyui_models.py).

What the broker relies on: each file a workflow names lands on the GPU at its own size and
shows in /system_stats; ComfyUI frees the models its node cache no longer holds, unloads its
own models (in free_memory's order) when the device, other processes included, lacks room,
and /free empties it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from gpubroker.sim import ComfyUIEmulator, GiB, MiB, SimGPU, flux_workflow, running
from gpubroker.sim import simple_workflow as sdxl
from gpubroker.sim.comfyui_models import minimum_inference_memory

pytestmark = pytest.mark.anyio

SIZES = {
    "a.safetensors": 4 * GiB,
    "b.safetensors": 4 * GiB,
    "small.safetensors": 2 * GiB,
    "flux1-dev.safetensors": 6 * GiB,
    "t5xxl_fp16.safetensors": 3 * GiB,
    "clip_l.safetensors": 256 * MiB,
    "ae.safetensors": 512 * MiB,
    "detail.safetensors": 300 * MiB,
    "4x-UltraSharp.pth": 1 * GiB,
}


@asynccontextmanager
async def comfy(
    gpu: SimGPU, **kwargs: Any
) -> AsyncIterator[tuple[ComfyUIEmulator, httpx.AsyncClient]]:
    emu = ComfyUIEmulator(gpu, 1 * GiB, model_sizes=SIZES, job_seconds=0.01, **kwargs)
    with anyio.fail_after(10):
        async with running(emu.app) as url, httpx.AsyncClient(base_url=url, trust_env=False) as c:
            yield emu, c


async def run(client: httpx.AsyncClient, prompt: dict[str, Any]) -> dict[str, Any]:
    """Queue ``prompt`` and wait for its end the way ComfyUI's frontend does: on the socket,
    ``executing`` with node null; then its history entry."""
    url = str(client.base_url).replace("http://", "ws://").rstrip("/")
    async with connect(f"{url}/ws?clientId=t", proxy=None) as ws:
        reply = await client.post("/api/prompt", json={"prompt": prompt, "client_id": "t"})
        assert reply.status_code == 200, reply.text
        prompt_id = reply.json()["prompt_id"]
        while True:
            frame = await ws.recv()
            if isinstance(frame, bytes):  # a preview image
                continue
            event = json.loads(frame)
            data = event["data"]
            ours = event["type"] == "executing" and data.get("prompt_id") == prompt_id
            if ours and data["node"] is None:
                break
    return (await client.get(f"/history/{prompt_id}")).json()[prompt_id]


async def torch_vram(client: httpx.AsyncClient) -> int:
    return int((await client.get("/system_stats")).json()["devices"][0]["torch_vram_total"])


async def test_a_checkpoint_a_workflow_names_is_loaded_at_its_size_and_shows_in_stats() -> None:
    gpu = SimGPU(16 * GiB)
    async with comfy(gpu) as (emu, client):
        assert await torch_vram(client) == 0 and emu.cached == ()
        entry = await run(client, sdxl(ckpt="a.safetensors"))
        assert entry["status"]["completed"]
        assert emu.cached == ("a.safetensors",)
        assert await torch_vram(client) == 4 * GiB == gpu.held("comfyui")
        await run(client, sdxl(ckpt="a.safetensors", seed=1))  # cached: not loaded again
        assert emu.loads == 1


async def test_a_file_no_size_is_given_for_takes_the_default_size() -> None:
    gpu = SimGPU(16 * GiB)
    async with comfy(gpu) as (emu, client):
        await run(client, sdxl(ckpt="unknown.ckpt"))
        assert emu.cached == ("unknown.ckpt",) and gpu.held("comfyui") == 1 * GiB


async def test_by_default_the_next_workflow_frees_what_it_does_not_name() -> None:
    # comfy_execution/caching.py: the default cache keeps only the outputs the new prompt
    # shares, so the old checkpoint's patcher is collected although both would fit.
    gpu = SimGPU(16 * GiB)
    async with comfy(gpu) as (emu, client):
        await run(client, sdxl(ckpt="a.safetensors"))
        await run(client, sdxl(ckpt="b.safetensors"))
        assert emu.cached == ("b.safetensors",)
        assert await torch_vram(client) == 4 * GiB
        await run(client, sdxl(ckpt="a.safetensors"))
        assert emu.cached == ("a.safetensors",) and emu.loads == 3


async def test_with_cache_lru_both_checkpoints_stay_when_they_fit() -> None:
    gpu = SimGPU(16 * GiB)
    async with comfy(gpu, cache_lru=100) as (emu, client):
        await run(client, sdxl(ckpt="a.safetensors"))
        await run(client, sdxl(ckpt="b.safetensors"))
        assert emu.cached == ("b.safetensors", "a.safetensors")
        assert await torch_vram(client) == 8 * GiB
        await run(client, sdxl(ckpt="a.safetensors"))  # still there: no load
        assert emu.loads == 2


async def test_with_cache_lru_the_older_is_unloaded_when_both_do_not_fit() -> None:
    # After a (4 GiB) a 9 GiB card has 5 GiB free: b itself fits, but load_models_gpu wants
    # 1.1 x 4 GiB + minimum_inference_memory (0.8 GiB + 400 MiB) free first, so a goes.
    assert 5 * GiB < int(4 * GiB * 1.1) + minimum_inference_memory() < 6 * GiB
    gpu = SimGPU(9 * GiB)
    async with comfy(gpu, cache_lru=100) as (emu, client):
        await run(client, sdxl(ckpt="a.safetensors"))
        entry = await run(client, sdxl(ckpt="b.safetensors"))
        assert entry["status"]["completed"] and gpu.oom_count == 0
        assert emu.cached == ("b.safetensors",) and await torch_vram(client) == 4 * GiB


async def test_memory_other_processes_hold_makes_comfyui_unload_its_own() -> None:
    # get_free_memory is the device's free memory: ComfyUI cannot tell another process's
    # bytes from free space it lacks, so it unloads its own models for room.
    gpu = SimGPU(16 * GiB)
    async with comfy(gpu, cache_lru=100) as (emu, client):
        await run(client, sdxl(ckpt="a.safetensors"))
        gpu.allocate("ollama", 7 * GiB)  # 5 GiB free: b fits, under the 5.6 GiB it wants
        await run(client, sdxl(ckpt="b.safetensors"))
        assert emu.cached == ("b.safetensors",) and gpu.by_owner() == {
            "ollama": 7 * GiB,
            "comfyui": 4 * GiB,
        }


async def test_the_smaller_model_is_unloaded_first_not_the_older() -> None:
    # model_management.py free_memory sorts what it may unload by (offloaded, refcount,
    # size, position) and stops once there is room: the smallest goes first, not the LRU.
    gpu = SimGPU(12 * GiB)
    async with comfy(gpu, cache_lru=100) as (emu, client):
        await run(client, sdxl(ckpt="a.safetensors"))  # 4 GiB, the older
        await run(client, sdxl(ckpt="small.safetensors"))  # 2 GiB, the newer
        gpu.allocate("other", 2 * GiB)  # 4 GiB free; b wants 1.1 x 4 + 1.2 = 5.6 GiB
        await run(client, sdxl(ckpt="b.safetensors"))
        assert emu.cached == ("b.safetensors", "a.safetensors")  # small's 2 GiB were enough
        assert gpu.oom_count == 0


async def test_a_flux_workflow_loads_each_file_and_a_lora_costs_nothing_of_its_own() -> None:
    gpu = SimGPU(24 * GiB)
    async with comfy(gpu) as (emu, client):
        entry = await run(client, flux_workflow(loras=("detail.safetensors",)))
        assert entry["status"]["completed"]
        assert set(emu.cached) == {
            "flux1-dev.safetensors",
            "t5xxl_fp16.safetensors",
            "clip_l.safetensors",
            "ae.safetensors",
        }
        # LoRA weights are merged into the UNET's (model_patcher.patch_weight_to_device)
        assert await torch_vram(client) == 6 * GiB + 3 * GiB + 256 * MiB + 512 * MiB


async def test_free_empties_the_cache_once_idle() -> None:
    gpu = SimGPU(24 * GiB)
    async with comfy(gpu, cache_lru=100) as (emu, client):
        await run(client, flux_workflow())
        await run(client, sdxl(ckpt="a.safetensors"))
        assert len(emu.cached) == 5
        reply = await client.post("/free", json={"unload_models": True})
        assert (reply.status_code, reply.content) == (200, b"")
        with anyio.fail_after(5):
            while emu.cached:
                await anyio.sleep(0.01)
        assert await torch_vram(client) == 0 and gpu.held("comfyui") == 0
        await run(client, sdxl(ckpt="a.safetensors"))  # loaded afresh after /free
        assert emu.cached == ("a.safetensors",) and emu.loads == 6


async def test_a_file_that_cannot_fit_is_an_oom_that_unloads_everything() -> None:
    gpu = SimGPU(8 * GiB)
    async with comfy(gpu, cache_lru=100) as (emu, client):
        await run(client, sdxl(ckpt="small.safetensors"))
        gpu.allocate("ollama", 3 * GiB)
        # flux (6 GiB) cannot fit beside ollama's 3 even with small unloaded
        entry = await run(client, flux_workflow())
        assert entry["status"]["status_str"] == "error"
        event, data = entry["status"]["messages"][-1]
        assert event == "execution_error" and data["exception_type"] == "torch.OutOfMemoryError"
        assert data["node_type"] == "UNETLoader"
        assert emu.cached == () and gpu.by_owner() == {"ollama": 3 * GiB}


async def test_an_upscale_model_is_on_the_gpu_for_its_node_only() -> None:
    gpu = SimGPU(16 * GiB)
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-UltraSharp.pth"}},
        "3": {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]},
        },
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "u", "images": ["3", 0]}},
    }
    async with comfy(gpu) as (emu, client):
        entry = await run(client, prompt)
        assert entry["status"]["completed"] and emu.loads == 1
        assert emu.cached == () and gpu.peak_used == 1 * GiB and gpu.used == 0


async def test_on_the_cpu_files_are_tracked_but_nothing_lands_on_the_gpu() -> None:
    gpu = SimGPU(4 * GiB)
    async with comfy(gpu, device_type="cpu") as (emu, client):
        entry = await run(client, flux_workflow())
        assert entry["status"]["completed"] and len(emu.cached) == 4 and gpu.used == 0
