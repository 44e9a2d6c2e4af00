"""``preload:`` end to end: real emulators on one simulated 24 GiB GPU behind a real broker.

The targets are made resident at start-up by real loads (Ollama's empty-prompt generate, vLLM's
wake-up), in order, within the budget; progress is in the status JSON and on ``/events``; a
target that fails or does not fit is a warning, and the broker serves all the same.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

from gpubroker.sim import GiB, OllamaEmulator, SimGPU, VLLMEmulator, running
from gpubroker.testing import broker_running, make_config
from processes import FAKE, free_port

pytestmark = pytest.mark.anyio

GPU_24 = [{"id": 0, "memory": "24GiB", "reserve": 0}]


def vllm_backend(url: str, vram: str) -> dict[str, Any]:
    return {"upstream": url, "unloadStrategy": "vllm", "vram": vram}


async def asleep(client: httpx.AsyncClient, url: str) -> bool:
    return bool((await client.get(url + "/is_sleeping")).json()["is_sleeping"])


async def status(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    return (await client.get(url + "/")).json()  # type: ignore[no-any-return]


async def until(client: httpx.AsyncClient, url: str, check: Any, limit: float = 20) -> Any:
    with anyio.fail_after(limit):
        while not check(st := await status(client, url)):
            await anyio.sleep(0.05)
    return st


def finished(st: dict[str, Any]) -> bool:
    return bool(st["preload"]) and all(
        p["state"] not in ("pending", "loading") for p in st["preload"]
    )


async def test_an_ollama_model_and_a_vllm_are_resident_before_the_first_request() -> None:
    gpu = SimGPU(24 * GiB)
    ollama = OllamaEmulator(gpu, {"llama3.1:8b": 9 * GiB}, owner="chat", load_seconds=1.0)
    vllm = VLLMEmulator(gpu, "qwen", weights=8 * GiB, kv_cache=5 * GiB)
    async with running(ollama.app) as o, running(vllm.app) as v, httpx.AsyncClient() as c:
        assert (await c.post(v + "/sleep", params={"level": 1})).status_code == 200
        assert await asleep(c, v)
        cfg = make_config(
            {
                "chat": {
                    "upstream": o,
                    "unloadStrategy": "ollama",
                    "models": [{"name": "llama3.1:8b", "vram": "9GiB"}],
                },
                "vllm": vllm_backend(v, "13GiB"),
            },
            policy="budget",
            gpus=GPU_24,
            preload=["chat/llama3.1:8b", "vllm"],
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
            seen: list[dict[str, Any]] = []

            async def follow() -> None:
                async with client.stream("GET", ep.status_url + "/events") as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            event = json.loads(line[6:])
                            if event["event"] == "preload":
                                seen.append(event)
                                if event["target"] == "vllm" and event["state"] == "done":
                                    return

            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                # The first request arrives while the Ollama model still loads: it waits
                # behind the preload as behind any swap, and evicts nothing.
                body = {"model": "llama3.1:8b", "messages": [], "stream": False}
                first = await client.post(ep.proxies["chat"] + "/api/chat", json=body)
                with anyio.fail_after(20):
                    st = await until(client, ep.status_url, finished)
                    while not seen or seen[-1]["state"] != "done":
                        await anyio.sleep(0.05)
            ps = (await client.get(o + "/api/ps")).json()["models"]
            awake = not await asleep(client, v)
    assert first.status_code == 200
    assert "evicted=-" in first.headers.get("x-gpubroker-swap", "evicted=-")
    assert st["preload"] == [
        {"target": "chat/llama3.1:8b", "state": "done", "error": None},
        {"target": "vllm", "state": "done", "error": None},
    ]
    assert [m["name"] for m in ps] == ["llama3.1:8b"] and awake
    assert st["backends"]["vllm"]["state"] == "resident"
    assert ollama.loads == 1 and gpu.oom_count == 0 and ollama.cpu_offloads == 0
    states = [(e["target"], e["state"]) for e in seen]
    assert ("vllm", "loading") in states and states[-1] == ("vllm", "done")
    assert st["swapCount"] == 0  # a preload loads, it never evicts


async def test_a_failing_or_unfitting_preload_is_a_warning_and_the_broker_serves() -> None:
    gpu = SimGPU(24 * GiB)
    ollama = OllamaEmulator(gpu, {"llama3.1:8b": 9 * GiB}, owner="chat")
    big = VLLMEmulator(gpu, "big", weights=14 * GiB, kv_cache=6 * GiB)
    small = VLLMEmulator(gpu, "small", weights=4 * GiB, kv_cache=4 * GiB)
    async with running(ollama.app) as o, running(big.app) as b, httpx.AsyncClient() as c:
        await c.post(b + "/sleep", params={"level": 1})  # each starts awake: one at a time
        async with running(small.app) as s:
            await c.post(s + "/sleep", params={"level": 1})
            await _failing_and_unfitting(gpu, o, b, s)


async def _failing_and_unfitting(gpu: SimGPU, o: str, b: str, s: str) -> None:
    """Preload a model Ollama does not have (fails), big (fits), small (no room beside big)."""
    cfg = make_config(
        {
            "chat": {"upstream": o, "unloadStrategy": "ollama"},
            "big": vllm_backend(b, "20GiB"),
            "small": vllm_backend(s, "8GiB"),
        },
        policy="budget",
        gpus=GPU_24,
        telemetryInterval="200ms",
        preload=["chat/nope:latest", "big", "small"],
    )
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
        st = await until(client, ep.status_url, finished)
        st = await until(
            client,
            ep.status_url,
            lambda x: sum(w["code"] == "preload_failed" for w in x["warnings"]) == 2,
        )
        served = await client.post(
            ep.proxies["big"] + "/v1/completions", json={"model": "big", "prompt": "hi"}
        )
        small_asleep = await asleep(client, s)
    assert [(p["target"], p["state"]) for p in st["preload"]] == [
        ("chat/nope:latest", "failed"),
        ("big", "done"),
        ("small", "skipped"),
    ]
    failed, skipped = st["preload"][0]["error"], st["preload"][2]["error"]
    assert "does not know model 'nope:latest'" in failed
    assert "does not fit beside what is resident" in skipped and "GPU 0" in skipped
    warned = {w["subject"]: w for w in st["warnings"] if w["code"] == "preload_failed"}
    assert set(warned) == {"chat/nope:latest", "small"}
    assert warned["small"]["backend"] == "small"
    assert served.status_code == 200 and small_asleep  # the skipped one was never woken
    assert gpu.oom_count == 0


async def test_a_managed_worker_is_started_by_its_preload() -> None:
    port = free_port()
    worker = {
        "upstream": f"http://127.0.0.1:{port}",
        "unloadStrategy": "process",
        "command": [*FAKE, "--start-delay", "0.3"],
        "healthPath": "/v1/models",
        "startTimeout": "20s",
        "stopTimeout": "2s",
    }
    cfg = make_config({"w": worker}, preload=["w"])
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
        st = await until(client, ep.status_url, finished)
        workers = (await client.get(ep.status_url + "/api/workers")).json()["workers"]
    assert st["preload"] == [{"target": "w", "state": "done", "error": None}]
    assert workers[0]["state"] == "ready" and st["backends"]["w"]["state"] == "resident"
    assert st["gpuRequests"] == {"w": 0}  # a preload is no request


async def test_under_exclusive_an_ollama_model_is_loaded_inside_its_backends_lease() -> None:
    gpu = SimGPU(24 * GiB)
    ollama = OllamaEmulator(gpu, {"llama3.1:8b": 9 * GiB, "qwen:7b": 6 * GiB}, owner="chat")
    async with running(ollama.app) as o:
        cfg = make_config(
            {"chat": {"upstream": o, "unloadStrategy": "ollama"}}, preload=["chat/qwen:7b"]
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
            st = await until(client, ep.status_url, finished)
            ps = (await client.get(o + "/api/ps")).json()["models"]
    assert st["preload"] == [{"target": "chat/qwen:7b", "state": "done", "error": None}]
    assert [m["name"] for m in ps] == ["qwen:7b"] and st["backends"]["chat"]["state"] == "resident"
