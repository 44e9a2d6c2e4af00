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
        assert reply.status_code == 200
        assert reply.json() == {"status": "sleeping", "level": 1}  # dev/sleep/api_router.py
        assert await is_sleeping(client)
        assert emu.gpu.used == 1 * GiB  # CUDA graphs stay
        assert emu.host_ram == 4 * GiB
        assert (await client.get("/health")).status_code == 200
        reply = await client.post("/wake_up")
        assert reply.json() == {"status": "awake", "tags": None}
        assert not await is_sleeping(client)
        assert emu.gpu.used == 11 * GiB and emu.host_ram == 0
        text = (await complete(client)).json()["choices"][0]["text"]
        assert text and GARBAGE_TOKEN not in text


async def test_a_request_while_asleep_waits_for_the_wake_instead_of_failing() -> None:
    async with vllm() as (emu, client):
        await client.post("/sleep", params={"level": 1})
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await complete(client))

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            with anyio.fail_after(3):
                while emu.requests_while_asleep == 0:
                    await anyio.sleep(0.005)
            await anyio.sleep(0.1)
            assert answers == []  # core.py pause_scheduler: queued, neither run nor refused
            await client.post("/wake_up")
        assert answers[0].status_code == 200
        assert GARBAGE_TOKEN not in answers[0].json()["choices"][0]["text"]


async def test_level_0_only_pauses_the_scheduler() -> None:
    async with vllm() as (emu, client):
        assert (await client.post("/sleep?level=0")).json()["level"] == 0
        assert await is_sleeping(client) and emu.gpu.used == 10 * GiB
        reply = await client.post("/wake_up", params={"tags": "scheduling"})
        assert reply.json()["status"] == "awake" and not await is_sleeping(client)


async def test_wake_with_a_tag_that_is_not_asleep_wakes_nothing() -> None:
    async with vllm() as (emu, client):
        await client.post("/sleep?level=1")
        reply = await client.post("/wake_up", params={"tags": "bogus"})
        assert reply.status_code == 200 and reply.json()["status"] == "sleeping"
        await client.post("/wake_up", params={"tags": "weights"})
        assert emu.gpu.used == 4 * GiB
        # executor/abstract.py Executor.wake_up: "weights" is awake already -> no-op.
        reply = await client.post("/wake_up", params=[("tags", "weights"), ("tags", "kv_cache")])
        assert reply.json() == {"status": "sleeping", "tags": ["weights", "kv_cache"]}
        assert emu.gpu.used == 4 * GiB and await is_sleeping(client)
        reply = await client.post("/wake_up", params={"tags": "kv_cache"})
        assert reply.json()["status"] == "awake" and emu.gpu.used == 10 * GiB


async def test_sleep_rejects_a_bad_level_or_mode_with_a_400() -> None:
    async with vllm() as (emu, client):
        for params in ({"level": 3}, {"level": "x"}, {"mode": "later"}):
            reply = await client.post("/sleep", params=params)
            assert reply.status_code == 400
            assert reply.json()["error"]["type"] == "Bad Request"
        assert not emu.is_sleeping


async def test_without_enable_sleep_mode_a_sleep_frees_nothing() -> None:
    async with vllm(sleep_mode=False) as (emu, client):
        assert (await client.post("/sleep?level=1")).status_code == 200
        assert await is_sleeping(client)  # says asleep...
        assert emu.gpu.used == 10 * GiB and emu.host_ram == 0  # ...and holds everything
        await client.post("/wake_up")
        assert not await is_sleeping(client) and emu.gpu.used == 10 * GiB


async def test_collective_rpc_needs_a_method() -> None:
    async with vllm() as (_emu, client):
        reply = await client.post("/collective_rpc", json={"args": []})
        assert reply.status_code == 400
        assert reply.json()["error"]["message"] == "Missing 'method' in request body"
        reply = await client.post("/collective_rpc", json=["reload_weights"])
        assert reply.status_code == 400


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
        reply = await client.post("/wake_up?tags=weights")
        assert reply.json() == {"status": "sleeping", "tags": ["weights"]}
        assert await is_sleeping(client)  # kv_cache still asleep
        assert emu.gpu.used == 4 * GiB
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
            ("GET", "/server_info"),
        ]:
            assert (await client.request(method, path)).status_code == 404


@pytest.mark.parametrize("sleep_mode", [True, False])
async def test_server_info_says_whether_sleep_mode_is_on(sleep_mode: bool) -> None:
    async with vllm(sleep_mode=sleep_mode) as (_emu, client):
        info = (await client.get("/server_info", params={"config_format": "json"})).json()
        assert info["vllm_config"]["model_config"]["enable_sleep_mode"] is sleep_mode
        assert info["vllm_env"]["VLLM_SERVER_DEV_MODE"] is True
        text = (await client.get("/server_info")).json()["vllm_config"]
        assert isinstance(text, str) and "sleep" not in text  # str(VllmConfig) never says
        assert (await client.get("/version")).json() == {"version": "0.33.0"}


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


async def test_sleep_mode_keep_freezes_a_request_and_the_wake_resumes_it() -> None:
    async with vllm(token_interval=0.02) as (emu, client):
        body = {"model": MODEL, "messages": [], "stream": True, "max_tokens": 10}
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            lines = reply.aiter_lines()
            await anext(lines)
            await client.post("/sleep", params={"level": 1, "mode": "keep"})
            assert emu.inflight == 1 and emu.gpu.used == 0
            await client.post("/wake_up")
            events = [line async for line in lines if line]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "length"  # resumed, not aborted
        assert emu.sleep_with_inflight == 0


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
