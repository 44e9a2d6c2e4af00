"""Model-level residency end to end: a real broker in front of the emulators on one simulated
GPU, under ``policy: budget``, with footprints declared per model file."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import ollama
import pytest

from gpubroker.scheduling.scheduler import State
from gpubroker.sim import (
    ComfyUIEmulator,
    GenericEmulator,
    GiB,
    OllamaEmulator,
    SimGPU,
    flux_workflow,
    gpu_app,
    running,
    simple_workflow,
)
from gpubroker.sim.ollama_models import SimModel
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


GPU_16 = [{"id": 0, "memory": "16GiB", "reserve": 0}]  # Ollama's default context here: 4096


def one_ollama(url: str, models: list[Any] | None = None, **top: Any) -> Any:
    """A budget broker's config for one Ollama backend on a 16 GiB card."""
    backend: dict[str, Any] = {"upstream": url, "unloadStrategy": "ollama"}
    if models is not None:
        backend["models"] = models
    top = {"minResidency": 0, "telemetryInterval": "100ms", **top}
    return make_config({"ollama": backend}, policy="budget", gpus=GPU_16, **top)


def sized(gib: float) -> SimModel:
    return SimModel(int(gib * GiB))


async def ollama_status(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    return (await client.get(url + "/")).json()


async def test_ollama_models_are_placed_one_by_one_and_only_what_is_needed_goes() -> None:
    gpu = SimGPU(16 * GiB)  # Ollama's default context on a card under 23 GiB: 4096
    emu = OllamaEmulator(gpu, {"small": sized(2), "mid": sized(4), "big": sized(7)})
    async with running(emu.app) as o, httpx.AsyncClient(timeout=10) as client:
        cfg = one_ollama(o)
        async with broker_running(cfg) as ep, ollama.AsyncClient(host=ep.proxies["ollama"]) as oc:
            await oc.generate(model="small", prompt="hi")
            await anyio.sleep(0.01)
            await oc.generate(model="mid", prompt="hi")
            # small + mid fit together, each sized by its estimate (weights + KV at 4096)
            assert sorted(emu.resident()) == ["mid:latest", "small:latest"]
            st = await ollama_status(client, ep.status_url)
            assert st["swapCount"] == 0 and st["backends"]["ollama"]["state"] == "resident"
            # big beside both would pass 16 GiB; beside mid alone it fits: only small goes
            reply = await oc.generate(model="big", prompt="hi")
            assert reply.response
            assert sorted(emu.resident()) == ["big:latest", "mid:latest"]
            [swap] = (await ollama_status(client, ep.status_url))["swaps"]
            assert swap["evicted"] == ["ollama/small:latest"] and swap["to"] == "ollama/big:latest"
    assert gpu.oom_count == 0 and emu.cpu_offloads == 0


async def test_a_longer_context_counts_its_kv_cache_and_makes_room_for_it() -> None:
    gpu = SimGPU(16 * GiB)
    emu = OllamaEmulator(gpu, {"chat": sized(4.5), "other": sized(4.5)})
    async with running(emu.app) as o:
        cfg = one_ollama(o)
        async with broker_running(cfg) as ep, ollama.AsyncClient(host=ep.proxies["ollama"]) as oc:
            await oc.generate(model="other", prompt="hi")
            await anyio.sleep(0.01)
            await oc.generate(model="chat", prompt="hi")
            assert sorted(emu.resident()) == ["chat:latest", "other:latest"]
            # 65536 tokens of an 8B-shaped model's f16 KV cache: 8 GiB more; both no longer fit
            reply = await oc.generate(model="chat", prompt="hi", options={"num_ctx": 65536})
            assert reply.response
            assert sorted(emu.resident()) == ["chat:latest"]
    assert gpu.oom_count == 0 and emu.cpu_offloads == 0


async def test_footprints_learned_on_one_run_size_the_next(tmp_path: Path) -> None:
    gpu = SimGPU(16 * GiB)
    emu = OllamaEmulator(gpu, {"chat": 5 * GiB})  # a fixed size: nothing to estimate it by
    async with running(emu.app) as o:
        cfg = one_ollama(o, stateDir=str(tmp_path))
        async with broker_running(cfg) as ep, ollama.AsyncClient(host=ep.proxies["ollama"]) as oc:
            await oc.generate(model="chat", prompt="hi")
            assert ep.broker is not None
            sched = ep.broker.sched
            with anyio.fail_after(5):  # unknown at first (the whole card); /api/ps tells
                while sched.slots["ollama/chat:latest"].spec.need is None:  # learned at rest
                    await anyio.sleep(0.02)
            assert sched.footprint("ollama/chat:latest", "0") == (5 * GiB, "measured")
        saved = json.loads((tmp_path / "footprints.json").read_text())
        assert saved["footprints"]["ollama/chat:latest"]["bytes"] == 5 * GiB
        async with broker_running(cfg) as ep:  # restarted: the model is known before any use
            assert ep.broker is not None
            with anyio.fail_after(5):
                while "ollama/chat:latest" not in ep.broker.sched.slots:
                    await anyio.sleep(0.02)
            assert ep.broker.sched.slots["ollama/chat:latest"].spec.need == 5 * GiB


async def test_a_model_ollama_lets_go_by_itself_is_seen_absent() -> None:
    gpu = SimGPU(16 * GiB)
    emu = OllamaEmulator(gpu, {"chat": sized(2)})
    async with running(emu.app) as o:
        cfg = one_ollama(o)
        async with broker_running(cfg) as ep, ollama.AsyncClient(host=ep.proxies["ollama"]) as oc:
            await oc.generate(model="chat", prompt="hi", keep_alive=0.2)
            assert ep.broker is not None
            sched = ep.broker.sched
            assert sched.state("ollama/chat:latest") is State.RESIDENT
            with anyio.fail_after(5):  # its keep_alive ran out: Ollama unloaded it
                while sched.state("ollama/chat:latest") is not State.ABSENT:
                    await anyio.sleep(0.02)
            assert sched.backend_state("ollama") is State.ABSENT


async def test_a_files_size_is_learned_from_how_much_comfyui_grew(tmp_path: Path) -> None:
    gpu = SimGPU(24 * GiB)
    comfy = ComfyUIEmulator(gpu, 7 * GiB, model_sizes=FILES, job_seconds=0.05)
    async with running(comfy.app) as c, running(gpu_app(gpu)) as g:
        cfg = make_config(
            {"comfyui": {"upstream": c, "unloadStrategy": "comfyui"}},  # no sizes declared
            policy="budget",
            gpus=GPU_24,
            telemetry="sim",
            telemetryUrl=g,
            telemetryInterval="100ms",
            stateDir=str(tmp_path),
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            assert ep.broker is not None
            await run_prompt(client, ep.proxies["comfyui"], simple_workflow())
            units = ep.broker.units
            with anyio.fail_after(5):  # once ComfyUI is idle, its growth is the file's size
                while units.file_size("comfyui", "sdxl.safetensors") is None:
                    await anyio.sleep(0.05)
            learned = units.file_size("comfyui", "sdxl.safetensors")
            assert learned is not None and 7 * GiB <= learned <= 7 * GiB + 2 * GiB
            # The next workflow naming it is sized by it: no longer the whole card.
            placed = await units.place(
                "comfyui", "POST", "/prompt", json.dumps({"prompt": simple_workflow()}).encode()
            )
            assert placed.need is not None and placed.need < 12 * GiB
        saved = json.loads((tmp_path / "footprints.json").read_text())["footprints"]
        assert saved["comfyui#sdxl.safetensors"]["bytes"] == learned


async def test_a_model_that_did_not_unload_in_time_is_not_loaded_over() -> None:
    gpu = SimGPU(10 * GiB)
    emu = OllamaEmulator(gpu, {"a": 6 * GiB}, token_interval=0.02, num_predict=100)
    gen = GenericEmulator(gpu, 6 * GiB, owner="gen")
    async with running(emu.app) as o, running(gen.app) as g:
        cfg = make_config(
            {
                "ollama": {
                    "upstream": o,
                    "unloadStrategy": "ollama",
                    "models": [{"name": "a", "vram": "6GiB"}],
                },
                "gen": {
                    "upstream": g,
                    "unloadStrategy": "generic",
                    "unloadEndpoint": "/unload",
                    "loadEndpoint": "/load",
                    "vram": "6GiB",
                },
            },
            policy="budget",
            gpus=[{"id": 0, "memory": "10GiB", "reserve": 0}],
            minResidency=0,
            unloadTimeout="0.5s",
            queueTimeout="20s",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
            one = {"model": "a", "prompt": "x", "stream": False}
            await client.post(ep.proxies["ollama"] + "/api/generate", json=one)
            async with anyio.create_task_group() as tg:
                # A client of Ollama's own keeps model a busy ~2 s: keep_alive 0 waits for it,
                # past unloadTimeout. Ollama still lists it, so nothing may load over it.
                tg.start_soon(partial(client.post, o + "/api/generate", json=one))
                await anyio.sleep(0.2)
                r = await client.post(ep.proxies["gen"] + "/generate", json={})
            assert r.status_code == 200
    assert gpu.oom_count == 0


async def test_a_model_holding_more_than_it_declares_is_warned_about() -> None:
    gpu = SimGPU(16 * GiB)
    emu = OllamaEmulator(gpu, {"chat": 5 * GiB})
    async with running(emu.app) as o, httpx.AsyncClient(timeout=10) as client:
        cfg = one_ollama(o, [{"name": "chat", "vram": "2GiB"}])
        async with broker_running(cfg) as ep, ollama.AsyncClient(host=ep.proxies["ollama"]) as oc:
            await oc.generate(model="chat", prompt="hi")
            with anyio.fail_after(5):
                while not (warnings := (await ollama_status(client, ep.status_url))["warnings"]):
                    await anyio.sleep(0.05)
    assert [w["code"] for w in warnings] == ["vram_mismatch"]
    assert warnings[0]["message"].startswith(
        "ollama/chat:latest declares vram 2.0 GiB but holds 5.0 GiB"
    )


async def test_a_long_context_once_does_not_size_the_model_for_good(tmp_path: Path) -> None:
    gpu = SimGPU(16 * GiB)
    emu = OllamaEmulator(gpu, {"chat": sized(4.5), "other": sized(4.5)})
    async with (
        running(emu.app) as o,
        broker_running(one_ollama(o, stateDir=str(tmp_path))) as ep,
        ollama.AsyncClient(host=ep.proxies["ollama"]) as oc,
    ):
        assert ep.broker is not None
        await oc.generate(model="chat", prompt="hi", options={"num_ctx": 65536})
        await oc.generate(model="chat", prompt="hi")  # the default context: Ollama reloads
        with anyio.fail_after(5):  # at rest, it is sized by what it holds now
            while ep.broker.sched.size("ollama/chat:latest", "0") > 8 * GiB:
                await anyio.sleep(0.05)
        await oc.generate(model="other", prompt="hi")
        assert sorted(emu.resident()) == ["chat:latest", "other:latest"]  # both fit again
    assert gpu.oom_count == 0


async def test_models_ollama_does_not_have_evict_nothing_and_leave_no_unit() -> None:
    gpu = SimGPU(16 * GiB)
    emu = OllamaEmulator(gpu, {"chat": sized(2)})
    embed = GenericEmulator(gpu, 3 * GiB, owner="embed")
    async with running(emu.app) as o, running(embed.app) as e:
        cfg = make_config(
            {
                "ollama": {"upstream": o, "unloadStrategy": "ollama"},
                "embed": {
                    "upstream": e,
                    "unloadStrategy": "generic",
                    "unloadEndpoint": "/unload",
                    "loadEndpoint": "/load",
                    "vram": "3GiB",
                },
            },
            policy="budget",
            gpus=GPU_16,
            minResidency=0,
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            assert ep.broker is not None
            assert (await client.post(ep.proxies["embed"] + "/generate", json={})).is_success
            base = ep.proxies["ollama"] + "/api/generate"
            await client.post(base, json={"model": "chat", "prompt": "x", "stream": False})
            for i in range(3):  # typos: Ollama answers 404, and loads nothing
                r = await client.post(base, json={"model": f"typo{i}", "prompt": "x"})
                assert r.status_code == 404
            assert embed.loaded and sorted(emu.resident()) == ["chat:latest"]
            assert ep.broker.sched.swap_count == 0
            assert not [u for u in ep.broker.sched.slots if "typo" in u]


async def test_an_admin_swap_names_a_model_of_a_backend_placed_by_model() -> None:
    gpu = SimGPU(16 * GiB)
    emu = OllamaEmulator(gpu, {"chat": sized(2)})
    async with running(emu.app) as o, httpx.AsyncClient(timeout=10) as client:
        cfg = one_ollama(o, [{"name": "chat", "vram": "3GiB"}])
        async with broker_running(cfg) as ep:
            whole = await client.post(ep.status_url + "/api/swap", json={"backend": "ollama"})
            assert whole.status_code == 400
            assert "swap to one of them (ollama/chat:latest)" in whole.json()["message"]
            one = await client.post(
                ep.status_url + "/api/swap", json={"backend": "ollama/chat:latest"}
            )
            assert one.status_code == 200 and one.json()["ok"] is True
