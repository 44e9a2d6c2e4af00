"""Model-level residency end to end: a real broker in front of the emulators on one simulated
GPU, under ``policy: budget``, with footprints declared per model file."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from gpubroker.sim import (
    ComfyUIEmulator,
    GenericEmulator,
    GiB,
    SimGPU,
    flux_workflow,
    running,
    simple_workflow,
)
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

GPU_24 = [{"id": 0, "memory": "24GiB", "reserve": 0}]
FILES = {
    "sdxl.safetensors": 7 * GiB,
    "flux1-dev.safetensors": 12 * GiB,
    "t5xxl_fp16.safetensors": 5 * GiB,
    "clip_l.safetensors": GiB // 4,
    "ae.safetensors": GiB // 4,
}


async def run_prompt(
    client: httpx.AsyncClient, base: str, prompt: dict[str, Any]
) -> dict[str, Any]:
    """Queue ``prompt`` through the broker and wait (bounded) until ComfyUI has run it."""
    r = await client.post(base + "/prompt", json={"prompt": prompt})
    assert r.status_code == 200, r.text
    pid = r.json()["prompt_id"]
    with anyio.fail_after(10):
        while not (history := (await client.get(f"{base}/history/{pid}")).json()):
            await anyio.sleep(0.02)
    assert history[pid]["status"]["status_str"] == "success"
    return r.json()


async def test_a_workflow_whose_files_would_not_fit_beside_the_cache_frees_comfyui_first() -> None:
    gpu = SimGPU(24 * GiB)
    comfy = ComfyUIEmulator(gpu, 7 * GiB, model_sizes=FILES, cache_lru=4, job_seconds=0.05)
    embed = GenericEmulator(gpu, 3 * GiB, owner="embed")
    async with running(comfy.app) as c, running(embed.app) as e:
        cfg = make_config(
            {
                "image": {
                    "upstream": c,
                    "unloadStrategy": "comfyui",
                    "models": [{"name": f, "vram": n} for f, n in FILES.items()],
                },
                "embed": {
                    "upstream": e,
                    "unloadStrategy": "generic",
                    "unloadEndpoint": "/unload",
                    "loadEndpoint": "/load",
                    "vram": "3GiB",
                },
            },
            policy="budget",
            gpus=GPU_24,
            minResidency=0,
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            image, embed_url = ep.proxies["image"], ep.proxies["embed"]
            assert (await client.post(embed_url + "/generate", json={})).is_success
            await run_prompt(client, image, simple_workflow())  # 7 GiB + working memory: fits
            assert comfy.cached == ("sdxl.safetensors",)
            # Flux's 17.5 GiB beside the cached SDXL and the embedder would pass 24 GiB; alone
            # beside the embedder it fits: ComfyUI is freed first, the embedder stays.
            await run_prompt(client, image, flux_workflow())
            status = (await client.get(ep.status_url + "/")).json()
            [swap] = status["swaps"]
            assert swap["evicted"] == ["image"] and swap["to"] == "image"
            assert "sdxl.safetensors" not in comfy.cached
            assert embed.loaded, "the embedder was evicted, though only ComfyUI's cache had to go"
            assert gpu.oom_count == 0
