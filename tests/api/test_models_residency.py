"""``/v1/models`` says, per model, whether it is resident on this node and how many requests
wait for it: the signals a router in front of several brokers places by (docs/scale-out.md).
Real brokers in front of the emulators, read with the official ``openai`` client."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import openai
import pytest

from gpubroker.sim import GiB, OllamaEmulator, SimGPU, VLLMEmulator, running
from gpubroker.sim.ollama_models import SimModel
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

QWEN = "Qwen/Qwen2.5-1.5B"
PROMPT = [{"role": "user", "content": "hi"}]


async def listed(api_url: str) -> dict[str, dict[str, Any]]:
    """Each model's ``gpubroker`` object, as the official client reads the list."""
    async with openai.AsyncOpenAI(base_url=api_url + "/v1", api_key="x", max_retries=0) as c:
        page = await c.models.list()
    return {m.id: dict(m.model_extra or {})["gpubroker"] for m in page.data}


async def test_an_ollama_model_is_resident_alone_under_budget_and_the_list_keeps_openai_shape() -> (
    None
):
    gpu = SimGPU(16 * GiB)
    emu = OllamaEmulator(gpu, {"small": SimModel(2 * GiB), "mid": SimModel(4 * GiB)})
    async with running(emu.app) as o:
        cfg = make_config(
            {"ollama": {"upstream": o, "unloadStrategy": "ollama"}},
            apiPort=20100,
            policy="budget",
            gpus=[{"id": 0, "memory": "16GiB", "reserve": 0}],
            minResidency=0,
        )
        async with broker_running(cfg) as ep:
            assert ep.api_url is not None
            with anyio.fail_after(20):
                before = await listed(ep.api_url)
                # both names Ollama lists, and its short aliases; nothing asked for yet
                assert before["small:latest"]["resident"] is False
                assert before["small:latest"]["state"] == "absent"
                assert before["small"]["unit"] == "ollama/small:latest"
                async with httpx.AsyncClient(timeout=10) as client:
                    r = await client.post(
                        ep.api_url + "/v1/chat/completions",
                        json={"model": "small", "messages": PROMPT, "max_tokens": 2},
                    )
                    assert r.status_code == 200, r.text
                    raw = (await client.get(ep.api_url + "/v1/models")).json()
                after = await listed(ep.api_url)
    assert raw["object"] == "list"
    assert all(set(m) == {"id", "object", "created", "owned_by", "gpubroker"} for m in raw["data"])
    # the model asked for is resident, under its short name too; the other one is not
    for name in ("small", "small:latest"):
        assert after[name] == {**after[name], "resident": True, "state": "resident", "queued": 0}
    assert after["mid"]["resident"] is False and after["mid"]["state"] == "absent"
    assert after["mid"]["backend"] == "ollama" and after["mid"]["reachable"] is True


async def test_a_request_waiting_behind_another_backend_shows_as_queued() -> None:
    # exclusive: vLLM streams slowly while it owns the GPU, a request for Ollama's model waits
    gpu = SimGPU(16 * GiB)
    emu_ollama = OllamaEmulator(gpu, {"llama3.2": 4 * GiB}, token_interval=0.002)
    emu_vllm = VLLMEmulator(
        gpu, QWEN, weights=4 * GiB, kv_cache=2 * GiB, token_interval=0.3, max_tokens=8
    )
    async with running(emu_vllm.app) as v, running(emu_ollama.app) as o:
        cfg = make_config(
            {
                "vllm": {"upstream": v, "unloadStrategy": "vllm"},
                "ollama": {"upstream": o, "unloadStrategy": "ollama"},
            },
            apiPort=20100,
            holdTime="0s",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
            assert ep.api_url is not None
            api = ep.api_url
            seen: list[dict[str, dict[str, Any]]] = []
            with anyio.fail_after(30):
                async with client.stream(
                    "POST",
                    api + "/v1/chat/completions",
                    json={"model": QWEN, "messages": PROMPT, "stream": True},
                ) as stream:
                    assert stream.status_code == 200
                    waiting: dict[str, Any] = {}

                    async def ask_ollama() -> None:
                        body = {"model": "llama3.2", "messages": PROMPT, "max_tokens": 2}
                        r = await client.post(api + "/v1/chat/completions", json=body)
                        waiting["status"] = r.status_code

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(ask_ollama)
                        while True:  # the Ollama request queues while vLLM's stream runs
                            models = await listed(api)
                            if models["llama3.2"]["queued"]:
                                seen.append(models)
                                break
                            await anyio.sleep(0.02)
                        async for _ in stream.aiter_bytes():
                            pass
            assert waiting["status"] == 200
            final = await listed(api)
    [during] = seen
    assert during["llama3.2"] == {**during["llama3.2"], "queued": 1, "resident": False}
    # vLLM still holds the GPU (draining once the swap began: it admits nothing new then)
    assert during[QWEN]["state"] in ("resident", "draining") and during[QWEN]["queued"] == 0
    # whole-backend units: the model's unit is its backend
    assert during[QWEN]["unit"] == "vllm" and during["llama3.2"]["unit"] == "ollama"
    assert final["llama3.2"]["resident"] is True and final["llama3.2"]["queued"] == 0
    assert final[QWEN]["resident"] is False
