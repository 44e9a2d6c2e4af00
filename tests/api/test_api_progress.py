"""A streaming chat through the api port that must wait for a swap shows why, in SSE comments,
and is answered by the backend the model lives on."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

from gpubroker.sim import GiB, OllamaEmulator, SimGPU, VLLMEmulator, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

LLAMA = "llama3.2:latest"


async def test_a_waiting_stream_through_the_api_port_gets_comments_then_its_answer() -> None:
    gpu = SimGPU(8 * GiB)
    v_emu = VLLMEmulator(gpu, "m", weights=4 * GiB, kv_cache=2 * GiB, wake_seconds=1.0)
    o_emu = OllamaEmulator(gpu, {LLAMA: 6 * GiB}, unload_seconds=1.0)
    async with running(v_emu.app) as v, running(o_emu.app) as o:
        cfg = make_config(
            {
                "vllm": {"upstream": v, "unloadStrategy": "vllm"},
                "ollama": {"upstream": o, "unloadStrategy": "ollama", "progress": "comments"},
            },
            apiPort=20100,
            holdTime="100ms",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=30) as client:
            api = f"{ep.api_url}/v1/chat/completions"
            r = await client.post(api, json={"model": "m", "messages": [], "max_tokens": 2})
            assert r.status_code == 200 and r.headers["x-gpubroker-backend"] == "vllm"
            await anyio.sleep(0.2)  # past the hold: Ollama must wait for vLLM to go
            chat = {"model": LLAMA, "messages": [{"role": "user", "content": "hi"}]}
            start = time.monotonic()
            lines: list[tuple[float, str]] = []
            async with client.stream("POST", api, json={**chat, "stream": True}) as reply:
                head = time.monotonic() - start
                async for line in reply.aiter_lines():
                    if line:
                        lines.append((time.monotonic() - start, line))
            status = (await client.get(ep.status_url + "/")).json()
    assert reply.status_code == 200 and head < 0.5  # the head at once, the swap still to come
    assert reply.headers["x-gpubroker-backend"] == "ollama"
    assert reply.headers["x-gpubroker-progress"] == "comments"
    comments = [line for _, line in lines if line.startswith(": swapping vllm→ollama")]
    data = [(t, line) for t, line in lines if line.startswith("data: ")]
    assert comments and data and data[-1][1] == "data: [DONE]"
    assert all(t < data[0][0] for t, line in lines if line.startswith(":"))
    assert status["totals"]["inFlight"] == 0 and status["queueLength"] == 0
    assert gpu.oom_count == 0
