"""``policy: budget`` end to end: real emulators on one simulated 24 GiB GPU behind a real broker.

The GPU's capacity is declared (``gpus: [{id: 0, memory: 24GiB}]``) and every backend declares
``vram:`` equal to what its emulator really allocates, so an over-commit would show as an OOM.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from gpubroker.sim import (
    ComfyUIEmulator,
    GenericEmulator,
    GiB,
    OllamaEmulator,
    SimGPU,
    VLLMEmulator,
    running,
    simple_workflow,
)
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

GPU_24 = [{"id": 0, "memory": "24GiB", "reserve": 0}]


def budget_config(backends: dict[str, dict[str, Any]], **top: Any) -> Any:
    return make_config(backends, policy="budget", gpus=GPU_24, **top)


def ollama(gpu: SimGPU, model: str, size_gib: int, owner: str) -> OllamaEmulator:
    return OllamaEmulator(gpu, {model: size_gib * GiB}, owner=owner)


async def chat(client: httpx.AsyncClient, base: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    return await client.post(base + "/api/chat", json=body)


async def image(client: httpx.AsyncClient, base: str) -> httpx.Response:
    """Queue an SDXL job and wait (bounded) until ComfyUI has finished it."""
    r = await client.post(base + "/prompt", json={"prompt": simple_workflow()})
    assert r.status_code == 200, r.text
    pid = r.json()["prompt_id"]
    with anyio.fail_after(5):
        while not (history := (await client.get(f"{base}/history/{pid}")).json()):
            await anyio.sleep(0.02)
    assert history[pid]["status"]["status_str"] == "success"
    return r


async def status(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    return (await client.get(url + "/")).json()


async def test_three_services_that_fit_together_co_reside_without_a_swap() -> None:
    gpu = SimGPU(24 * GiB)
    chat_emu = ollama(gpu, "llama3.1:8b", 9, "ollama")
    comfy = ComfyUIEmulator(gpu, model_size=7 * GiB, job_seconds=0.1)
    embed = GenericEmulator(gpu, 1 * GiB, owner="embed")
    async with running(chat_emu.app) as o, running(comfy.app) as c, running(embed.app) as e:
        cfg = budget_config(
            {
                "chat": {"upstream": o, "unloadStrategy": "ollama", "vram": "9GiB"},
                "image": {"upstream": c, "unloadStrategy": "comfyui", "vram": "7GiB"},
                "embed": {
                    "upstream": e,
                    "unloadStrategy": "generic",
                    "unloadEndpoint": "/unload",
                    "vram": "1GiB",
                },
            }
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                responses = [
                    await chat(client, ep.proxies["chat"], "llama3.1:8b"),
                    await image(client, ep.proxies["image"]),
                    await client.post(ep.proxies["embed"] + "/generate", json={"stream": False}),
                ]
                # All three at once now: everyone is resident, nobody waits for a swap.
                again: list[httpx.Response] = []

                async def call(coro: Any) -> None:
                    again.append(await coro)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(call, chat(client, ep.proxies["chat"], "llama3.1:8b"))
                    tg.start_soon(call, image(client, ep.proxies["image"]))
                    tg.start_soon(
                        call, client.post(ep.proxies["embed"] + "/generate", json={"stream": False})
                    )
            st = await status(client, ep.status_url)
            used = gpu.used
    assert [r.status_code for r in responses + again] == [200] * 6
    assert not any("x-gpubroker-swap" in r.headers for r in responses + again)
    assert st["swapCount"] == 0 and st["swaps"] == []
    assert {name: b["state"] for name, b in st["backends"].items()} == {
        "chat": "resident",
        "image": "resident",
        "embed": "resident",
    }
    assert used == 17 * GiB and gpu.oom_count == 0 and chat_emu.cpu_offloads == 0
    assert chat_emu.unloads == 0 and comfy.loads == 1 and embed.unloads == 0


async def test_a_backend_that_can_never_fit_gets_an_immediate_507_with_the_numbers() -> None:
    gpu = SimGPU(24 * GiB)
    huge = ollama(gpu, "llama3.1:70b", 40, "huge")
    pin = ollama(gpu, "pinned:latest", 16, "pin")
    mid = ollama(gpu, "mid:latest", 12, "mid")
    async with running(huge.app) as h, running(pin.app) as p, running(mid.app) as m:
        cfg = budget_config(
            {
                "huge": {"upstream": h, "unloadStrategy": "ollama", "vram": "40GiB"},
                "pin": {"upstream": p, "unloadStrategy": "ollama", "vram": "16GiB", "pinned": True},
                "mid": {"upstream": m, "unloadStrategy": "ollama", "vram": "12GiB"},
            }
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            started = anyio.current_time()
            with anyio.fail_after(5):
                too_big = await chat(client, ep.proxies["huge"], "llama3.1:70b")
            took = anyio.current_time() - started
            with anyio.fail_after(5):
                assert (await chat(client, ep.proxies["pin"], "pinned")).status_code == 200
                blocked = await chat(client, ep.proxies["mid"], "mid")
            st = await status(client, ep.status_url)
    assert too_big.status_code == 507 and took < 1.0
    body = too_big.json()
    assert body["error"] == "never_fits" and body["backend"] == "huge"
    assert body["retryable"] is False
    assert "40.0 GiB" in body["message"] and "24.0 GiB" in body["message"]
    assert blocked.status_code == 507  # 12 GiB next to 16 GiB pinned on 24 GiB: never
    assert "12.0 GiB" in blocked.json()["message"]
    assert "16.0 GiB pinned" in blocked.json()["message"]
    assert huge.loads == 0 and mid.loads == 0  # refused before reaching the service
    assert pin.unloads == 0 and st["backends"]["pin"]["state"] == "resident"
    assert st["swapCount"] == 0 and gpu.oom_count == 0


async def test_what_does_not_fit_evicts_only_the_needed_victim_never_a_pinned_one() -> None:
    gpu = SimGPU(24 * GiB)
    # pin is the lowest priority and least recently used, but pinned; hi has priority 5.
    sizes = {"pin": 4, "hi": 6, "a": 6, "b": 6, "c": 6}
    emus = {name: ollama(gpu, f"{name}:latest", gib, name) for name, gib in sizes.items()}
    extra = {"pin": {"pinned": True}, "hi": {"priority": 5}}
    async with (
        running(emus["pin"].app) as u_pin,
        running(emus["hi"].app) as u_hi,
        running(emus["a"].app) as u_a,
        running(emus["b"].app) as u_b,
        running(emus["c"].app) as u_c,
    ):
        urls = {"pin": u_pin, "hi": u_hi, "a": u_a, "b": u_b, "c": u_c}
        cfg = budget_config(
            {
                name: {
                    "upstream": urls[name],
                    "unloadStrategy": "ollama",
                    "vram": f"{gib}GiB",
                    **extra.get(name, {}),
                }
                for name, gib in sizes.items()
            },
            minResidency=0,
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                for name in ("pin", "hi", "a", "b"):  # 22 GiB: all co-reside
                    r = await chat(client, ep.proxies[name], name)
                    assert r.status_code == 200 and "x-gpubroker-swap" not in r.headers
                    await anyio.sleep(0.02)  # distinct last-used times
                to_c = await chat(client, ep.proxies["c"], "c")  # 28 GiB: 4 must go
                await anyio.sleep(0.02)
                back_to_a = await chat(client, ep.proxies["a"], "a")  # a returns: 4 must go
            st = await status(client, ep.status_url)
            used = gpu.used
    assert to_c.status_code == 200
    # Ollama's models are units of their own under budget: the header names the model's unit
    assert to_c.headers["x-gpubroker-swap"].startswith("evicted=a/a:latest; to=c/c:latest;")
    assert back_to_a.status_code == 200
    assert back_to_a.headers["x-gpubroker-swap"].startswith("evicted=b/b:latest; to=a/a:latest;")
    assert {n: e.unloads for n, e in emus.items()} == {"pin": 0, "hi": 0, "a": 1, "b": 1, "c": 0}
    assert st["swapCount"] == 2
    states = {n: b["state"] for n, b in st["backends"].items()}
    assert states == {"pin": "resident", "hi": "resident", "a": "resident", "b": "absent",
                      "c": "resident"}  # fmt: skip
    assert used == 22 * GiB and gpu.oom_count == 0
    # Real Ollama does not OOM where it does not fit: it runs layers on the CPU (sched.go).
    assert not any(e.cpu_offloads for e in emus.values())


async def test_vllm_is_slept_not_unloaded_when_it_is_the_cheapest_victim() -> None:
    gpu = SimGPU(24 * GiB)
    vllm = VLLMEmulator(gpu, "qwen", weights=8 * GiB, kv_cache=5 * GiB)  # resident from start
    chat_emu = ollama(gpu, "llama3.1:8b", 9, "ollama")
    comfy = ComfyUIEmulator(gpu, model_size=7 * GiB, job_seconds=0.1)
    async with running(vllm.app) as v, running(chat_emu.app) as o, running(comfy.app) as c:
        cfg = budget_config(
            {
                "vllm": {"upstream": v, "unloadStrategy": "vllm", "vram": "13GiB"},
                "chat": {"upstream": o, "unloadStrategy": "ollama", "vram": "9GiB"},
                "image": {"upstream": c, "unloadStrategy": "comfyui", "vram": "7GiB"},
            },
            minResidency=0,
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                first = await chat(client, ep.proxies["chat"], "llama3.1:8b")  # 22 GiB: fits
                pic = await image(client, ep.proxies["image"])  # 29 GiB: vLLM is cheapest
                mid = await status(client, ep.status_url)
                asleep = (vllm.is_sleeping, vllm.host_ram, vllm.started)
                chat_unloads = chat_emu.unloads
                await anyio.sleep(0.02)
                answer = await client.post(
                    ep.proxies["vllm"] + "/v1/chat/completions",
                    json={"model": "qwen", "messages": [{"role": "user", "content": "x"}]},
                )
            st = await status(client, ep.status_url)
    assert first.status_code == 200 and "x-gpubroker-swap" not in first.headers
    assert pic.headers["x-gpubroker-swap"].startswith("evicted=vllm; to=image;")
    assert mid["backends"]["vllm"]["state"] == "asleep"
    assert asleep == (True, 8 * GiB, True)  # slept: weights in host RAM, process still up
    assert chat_unloads == 0  # the dearer victim was spared
    assert answer.status_code == 200 and "garbage" not in answer.text
    assert answer.headers["x-gpubroker-swap"].startswith("evicted=chat/llama3.1:8b; to=vllm;")
    assert not vllm.is_sleeping and st["backends"]["vllm"]["state"] == "resident"
    assert vllm.sleep_with_inflight == 0 and vllm.requests_while_asleep == 0
    assert gpu.oom_count == 0 and chat_emu.cpu_offloads == 0


async def test_services_on_different_gpus_never_wait_for_each_other() -> None:
    from functools import partial

    gpu0, gpu1 = SimGPU(16 * GiB, index=0), SimGPU(16 * GiB, index=1, uuid="GPU-sim-1")
    a = GenericEmulator(gpu0, 12 * GiB, owner="a", token_interval=0.05, tokens=30)
    c = GenericEmulator(gpu0, 12 * GiB, owner="c")
    b = GenericEmulator(gpu1, 12 * GiB, owner="b")
    async with running(a.app) as ua, running(b.app) as ub, running(c.app) as uc:
        spec = {"unloadStrategy": "generic", "unloadEndpoint": "/unload", "vram": "12GiB"}
        cfg = make_config(
            {
                "a": {"upstream": ua, "gpu": 0, **spec},
                "c": {"upstream": uc, "gpu": 0, **spec},
                "b": {"upstream": ub, "gpu": 1, **spec},
            },
            policy="budget",
            gpus=[{"id": 0, "memory": "16GiB"}, {"id": 1, "memory": "16GiB"}],
            holdTime="30s",
            telemetry="none",
        )
        async with (
            broker_running(cfg) as ep,
            httpx.AsyncClient(timeout=10) as client,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(partial(client.post, ep.proxies["a"] + "/generate", json={}))
            await anyio.sleep(0.2)  # a streams for ~1.5 s on GPU 0
            tg.start_soon(partial(client.post, ep.proxies["c"] + "/generate", json={}))
            await anyio.sleep(0.1)  # c waits for a on GPU 0 (hold 30 s)
            started = anyio.current_time()
            r = await client.post(ep.proxies["b"] + "/generate", json={"stream": False})
            waited = anyio.current_time() - started
            status = (await client.get(ep.status_url + "/")).json()
            tg.cancel_scope.cancel()
    assert r.status_code == 200
    assert waited < 0.5  # GPU 1 did not wait behind GPU 0's queue
    assert status["backends"]["c"]["queued"] == 1
    assert gpu0.oom_count == gpu1.oom_count == 0
