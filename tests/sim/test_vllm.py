"""VLLMEmulator over real HTTP: flat VRAM, sleep levels and their traps (BACKENDS.md, 3)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from gpubroker.sim import GiB, SimGPU, StartupFailed, VLLMEmulator, VLLMStartupError, running
from gpubroker.sim.wire import GARBAGE_TOKEN

pytestmark = pytest.mark.anyio

MODEL = "Qwen/Qwen3-0.6B"


@asynccontextmanager
async def vllm(
    gpu: SimGPU | None = None, **kwargs: Any
) -> AsyncIterator[tuple[VLLMEmulator, httpx.AsyncClient]]:
    emu = VLLMEmulator(gpu or SimGPU(16 * GiB), MODEL, 4 * GiB, 6 * GiB, **kwargs)
    with anyio.fail_after(10):
        async with running(emu.app) as url, httpx.AsyncClient(base_url=url, trust_env=False) as c:
            yield emu, c


async def complete(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})


async def is_sleeping(client: httpx.AsyncClient) -> bool:
    return (await client.get("/is_sleeping")).json()["is_sleeping"]


async def test_startup_holds_weights_and_kv_cache_flat() -> None:
    async with vllm(cuda_graphs=1 * GiB) as (emu, client):
        assert emu.gpu.by_owner() == {"vllm": 11 * GiB}
        assert (await client.get("/health")).status_code == 200
        await complete(client)
        assert emu.gpu.used == 11 * GiB  # no growth while serving
    assert emu.gpu.used == 0  # the process is gone


async def test_startup_fails_without_enough_free_memory() -> None:
    gpu = SimGPU(16 * GiB)
    gpu.allocate("ollama", 8 * GiB)
    emu = VLLMEmulator(gpu, MODEL, 4 * GiB, 6 * GiB)
    with pytest.raises(VLLMStartupError, match="less than desired GPU memory utilization"):
        await emu.startup()
    with anyio.fail_after(5), pytest.raises(StartupFailed, match="Free memory on device"):
        async with running(emu.app):
            pytest.fail("should not start")
    assert gpu.by_owner() == {"ollama": 8 * GiB} and gpu.oom_count == 0


async def test_level_1_sleep_frees_vram_to_host_ram_and_wakes_intact() -> None:
    async with vllm(cuda_graphs=1 * GiB) as (emu, client):
        reply = await client.post("/sleep", params={"level": 1})
        assert (reply.status_code, reply.content) == (200, b"")
        assert await is_sleeping(client)
        assert emu.gpu.used == 1 * GiB  # CUDA graphs stay
        assert emu.host_ram == 4 * GiB
        assert (await client.get("/health")).status_code == 200
        reply = await complete(client)
        assert reply.status_code == 500 and "error" in reply.json()
        assert emu.requests_while_asleep == 1
        reply = await client.post("/wake_up")
        assert (reply.status_code, reply.content) == (200, b"")
        assert not await is_sleeping(client)
        assert emu.gpu.used == 11 * GiB and emu.host_ram == 0
        text = (await complete(client)).json()["choices"][0]["text"]
        assert text and GARBAGE_TOKEN not in text


async def test_level_2_wake_without_reload_gives_garbage() -> None:
    async with vllm() as (emu, client):
        await client.post("/sleep?level=2")
        assert emu.gpu.used == 0 and emu.host_ram == 0
        await client.post("/wake_up")
        reply = await complete(client)
        assert reply.status_code == 200
        assert GARBAGE_TOKEN in reply.json()["choices"][0]["text"]


async def test_level_2_correct_wake_sequence() -> None:
    async with vllm() as (emu, client):
        await client.post("/sleep?level=2")
        await client.post("/wake_up?tags=weights")
        assert await is_sleeping(client)  # kv_cache still asleep
        assert emu.gpu.used == 4 * GiB
        assert (await complete(client)).status_code == 500
        reply = await client.post("/collective_rpc", json={"method": "reload_weights"})
        assert reply.status_code == 200
        await client.post("/wake_up", params=[("tags", "kv_cache")])
        assert not await is_sleeping(client)
        text = (await complete(client)).json()["choices"][0]["text"]
        assert GARBAGE_TOKEN not in text
        assert emu.gpu.used == 10 * GiB


async def test_sleep_and_wake_are_idempotent() -> None:
    async with vllm() as (emu, client):
        for _ in range(2):
            assert (await client.post("/sleep?level=1")).status_code == 200
        assert emu.host_ram == 4 * GiB and emu.gpu.used == 0
        for _ in range(2):
            assert (await client.post("/wake_up")).status_code == 200
        assert emu.gpu.used == 10 * GiB and emu.gpu.oom_count == 0


async def test_sleep_routes_are_404_without_dev_mode() -> None:
    async with vllm(dev_mode=False) as (_emu, client):
        for method, path in [
            ("POST", "/sleep"),
            ("POST", "/wake_up"),
            ("GET", "/is_sleeping"),
            ("POST", "/collective_rpc"),
        ]:
            assert (await client.request(method, path)).status_code == 404


async def test_sleep_with_requests_in_flight_is_a_counted_fault() -> None:
    async with vllm(token_interval=0.02) as (emu, client):
        body = {"model": MODEL, "messages": [], "stream": True, "max_tokens": 50}
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            lines = reply.aiter_lines()
            await anext(lines)
            assert emu.inflight == 1
            await client.post("/sleep?level=1")
            events = [line async for line in lines if line]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "abort"
        assert emu.sleep_with_inflight == 1
        assert emu.inflight == 0


async def test_sleep_mode_wait_drains_first() -> None:
    async with vllm(token_interval=0.02) as (emu, client):
        async with anyio.create_task_group() as tg:
            tg.start_soon(complete, client)
            with anyio.fail_after(2):
                while emu.inflight == 0:
                    await anyio.sleep(0.005)
            await client.post("/sleep", params={"level": 1, "mode": "wait"})
            assert emu.inflight == 0
        assert emu.sleep_with_inflight == 0 and emu.is_sleeping


async def test_openai_routes() -> None:
    async with vllm() as (_emu, client):
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list"
        assert models["data"][0]["id"] == MODEL and models["data"][0]["owned_by"] == "vllm"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        reply = await client.post("/v1/chat/completions", json=body)
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [e for e in reply.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        reply = await client.post("/v1/chat/completions", json={**body, "stream": False})
        assert reply.json()["choices"][0]["message"]["content"]
        reply = await client.post("/v1/completions", json={"model": "other", "prompt": "x"})
        assert reply.status_code == 404
        metrics = (await client.get("/metrics")).text
        assert "vllm:num_requests_running" in metrics
