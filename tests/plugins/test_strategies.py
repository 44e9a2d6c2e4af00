"""Builtin strategies against the emulators, with no broker: each frees what it says it frees."""

from __future__ import annotations

import anyio
import httpx
import pytest

from gpubroker.config.model import BackendConfig
from gpubroker.errors import StrategyFailed
from gpubroker.plugins.strategies.base import Strategy, StrategyContext
from gpubroker.plugins.strategies.builtin import (
    ComfyUIStrategy,
    GenericStrategy,
    OllamaStrategy,
    VLLMStrategy,
)
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

pytestmark = pytest.mark.anyio


def strategy(cls: type[Strategy], url: str, client: httpx.AsyncClient, **kw: object) -> Strategy:
    backend = BackendConfig(name="x", proxy_port=1, upstream=url, unload_strategy=cls.name, **kw)  # type: ignore[arg-type]
    return cls(StrategyContext(backend=backend, client=client, unload_timeout=5.0))


async def test_ollama_unload_waits_until_ps_is_empty_even_with_a_stream_in_flight() -> None:
    gpu = SimGPU(8 * GiB)
    emu = OllamaEmulator(gpu, {"m:latest": 3 * GiB}, token_interval=0.05, num_predict=6)
    async with running(emu.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        s = strategy(OllamaStrategy, url, client)
        assert await s.resident() is False
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.post("/api/generate", json={"model": "m", "prompt": "x"}))
            with anyio.fail_after(5):
                while not emu.in_flight("m"):
                    await anyio.sleep(0.01)
            assert await s.resident() is True
            with anyio.fail_after(5):
                await s.unload()
            assert emu.in_flight("m") == 0  # returned only after the stream ended
    assert gpu.held("ollama") == 0 and emu.unloads == 1


async def test_comfyui_busy_follows_the_queue_and_unload_frees_the_checkpoint() -> None:
    gpu = SimGPU(8 * GiB)
    emu = ComfyUIEmulator(gpu, model_size=4 * GiB, job_seconds=0.3)
    async with running(emu.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        s = strategy(ComfyUIStrategy, url, client)
        assert await s.busy() is False
        await client.post("/prompt", json={"prompt": simple_workflow()})
        assert await s.busy() is True  # /prompt returned, the job is still running
        with anyio.fail_after(5):
            while await s.busy():
                await anyio.sleep(0.02)
        assert await s.resident() is True
        with anyio.fail_after(5):
            await s.unload()
        assert await s.resident() is False
    assert gpu.held("comfyui") == 0


@pytest.mark.parametrize("level", [1, 2])
async def test_vllm_sleeps_and_wakes_at_its_level(level: int) -> None:
    gpu = SimGPU(16 * GiB)
    emu = VLLMEmulator(gpu, "m", weights=4 * GiB, kv_cache=2 * GiB)
    async with running(emu.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        s = strategy(VLLMStrategy, url, client, sleep_level=level)
        assert await s.resident() is True
        await s.unload()
        assert await s.resident() is False and gpu.held("vllm", "weights") == 0
        await s.load()
        assert await s.resident() is True
        r = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert r.status_code == 200 and "garbage" not in r.text


async def test_vllm_sleep_lets_a_request_the_broker_did_not_see_finish() -> None:
    gpu = SimGPU(16 * GiB)
    emu = VLLMEmulator(gpu, "m", weights=4 * GiB, kv_cache=2 * GiB, token_interval=0.02)
    async with running(emu.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        s = strategy(VLLMStrategy, url, client)
        body = {"model": "m", "prompt": "x", "stream": True, "max_tokens": 10}
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            lines = reply.aiter_lines()
            await anext(lines)  # a client talking to vLLM directly, mid-stream
            with anyio.fail_after(5):
                await s.unload()
            rest = [line async for line in lines if line]
        assert '"finish_reason":"length"' in rest[-2].replace(" ", "")  # not cut: "abort"
        assert emu.sleep_with_inflight == 0 and await s.resident() is False


async def test_vllm_without_dev_mode_says_how_to_enable_sleep() -> None:
    gpu = SimGPU(16 * GiB)
    emu = VLLMEmulator(gpu, "m", weights=4 * GiB, kv_cache=2 * GiB, dev_mode=False)
    async with running(emu.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        s = strategy(VLLMStrategy, url, client)
        with pytest.raises(StrategyFailed, match="VLLM_SERVER_DEV_MODE=1"):
            await s.unload()
        assert await s.resident() is None  # cannot tell, so the broker frees others first


async def test_generic_posts_its_endpoints_and_is_a_no_op_without_them() -> None:
    gpu = SimGPU(8 * GiB)
    emu = GenericEmulator(gpu, 2 * GiB)
    async with running(emu.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        s = strategy(GenericStrategy, url, client, unload_endpoint="/unload", load_endpoint="/load")
        await s.load()
        assert emu.loaded
        await s.unload()
        assert not emu.loaded and gpu.held("generic") == 0
        await strategy(GenericStrategy, url, client).unload()  # nothing configured: no call
    assert emu.unloads == 1


async def test_a_failing_endpoint_raises_with_what_the_service_said() -> None:
    gpu = SimGPU(8 * GiB)
    emu = GenericEmulator(gpu, 2 * GiB)
    async with running(emu.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        s = strategy(GenericStrategy, url, client, unload_endpoint="/no-such-route")
        with pytest.raises(StrategyFailed, match="404"):
            await s.unload()


async def test_comfyui_jobs_are_its_queue_running_then_pending() -> None:
    gpu = SimGPU(8 * GiB)
    emu = ComfyUIEmulator(gpu, 2 * GiB, job_seconds=0.4)
    async with running(emu.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        s = strategy(ComfyUIStrategy, url, client)
        assert await s.jobs() == [] and await s.busy() is False
        ids = [
            (await client.post("/prompt", json={"prompt": simple_workflow()})).json()["prompt_id"]
            for _ in range(3)
        ]
        with anyio.fail_after(5):
            while not (jobs := await s.jobs()) or jobs[0].state != "running":
                await anyio.sleep(0.01)
        assert [j.id for j in jobs] == ids and [j.state for j in jobs] == [
            "running", "pending", "pending",
        ]  # fmt: skip
        assert {j.url for j in jobs} == {"/prompt"} and await s.busy() is True
        with anyio.fail_after(10):
            while await s.jobs():
                await anyio.sleep(0.05)


@pytest.mark.parametrize("device", ["cpu", "mps", "privateuseone"])
async def test_comfyui_off_cuda_neither_claims_residency_nor_waits_on_system_stats(
    device: str,
) -> None:
    gpu = SimGPU(8 * GiB)
    emu = ComfyUIEmulator(gpu, 2 * GiB, job_seconds=0.01, device_type=device)
    async with running(emu.app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        s = strategy(ComfyUIStrategy, url, client)
        await client.post("/prompt", json={"prompt": simple_workflow()})
        with anyio.fail_after(5):
            while await s.busy():
                await anyio.sleep(0.01)
        assert await s.resident() is None  # system RAM in torch_vram_total means nothing here
        with anyio.fail_after(1):  # returns once /free is asked, not after unloadTimeout
            await s.unload()
