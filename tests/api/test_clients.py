"""The official ``openai`` and ``ollama`` clients pointed at the api port, unchanged.

Two backends on one simulated GPU that cannot both be resident (Ollama's model and vLLM's
weights + KV cache are 6 GiB each on 8 GiB): alternating models across them swaps, and the
GPU never runs out of memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import ollama
import openai
import pytest

from gpubroker.runtime import Endpoints
from gpubroker.sim import GiB, OllamaEmulator, SimGPU, VLLMEmulator, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

LLAMA = "llama3.2:latest"
QWEN = "Qwen/Qwen2.5-1.5B"
PROMPT = [{"role": "user", "content": "hi"}]


@asynccontextmanager
async def two_backends() -> AsyncIterator[tuple[Endpoints, SimGPU]]:
    gpu = SimGPU(8 * GiB)
    emu_ollama = OllamaEmulator(gpu, {LLAMA: 6 * GiB}, token_interval=0.002)
    emu_vllm = VLLMEmulator(gpu, QWEN, weights=4 * GiB, kv_cache=2 * GiB, token_interval=0.002)
    async with running(emu_vllm.app) as v, running(emu_ollama.app) as o:
        cfg = make_config(
            {
                "vllm": {"upstream": v, "unloadStrategy": "vllm"},
                "ollama": {"upstream": o, "unloadStrategy": "ollama"},
            },
            apiPort=20100,
            holdTime="100ms",
        )
        async with broker_running(cfg) as ep:
            yield ep, gpu


async def swaps(ep: Endpoints) -> int:
    async with httpx.AsyncClient() as client:
        return int((await client.get(ep.status_url + "/")).json()["swapCount"])


async def test_openai_async_client_alternates_models_across_backends_with_swaps() -> None:
    async with two_backends() as (ep, gpu):
        assert ep.api_url is not None
        client = openai.AsyncOpenAI(base_url=ep.api_url + "/v1", api_key="x", max_retries=0)
        with anyio.fail_after(30):
            for model in (LLAMA, QWEN, LLAMA, QWEN):
                raw = await client.chat.completions.with_raw_response.create(
                    model=model, messages=PROMPT, max_tokens=4
                )
                reply = raw.parse()
                assert reply.choices[0].message.content
                want = "ollama" if model == LLAMA else "vllm"
                assert raw.headers["x-gpubroker-backend"] == want
            assert await swaps(ep) >= 3
        await client.close()
    assert gpu.oom_count == 0


async def test_openai_streaming_chat_embeddings_and_models_list() -> None:
    async with two_backends() as (ep, gpu):
        assert ep.api_url is not None
        client = openai.AsyncOpenAI(base_url=ep.api_url + "/v1", api_key="x", max_retries=0)
        with anyio.fail_after(30):
            models = {m.id: m.owned_by async for m in client.models.list()}
            assert models[LLAMA] == "ollama" and models[QWEN] == "vllm"
            for model in (QWEN, LLAMA):
                stream = await client.chat.completions.create(
                    model=model, messages=PROMPT, max_tokens=4, stream=True
                )
                pieces = [c.choices[0].delta.content async for c in stream if c.choices]
                assert "".join(p for p in pieces if p)
            emb = await client.embeddings.create(model=LLAMA, input=["a", "b"])
            assert len(emb.data) == 2 and emb.data[0].embedding
            one = await client.models.retrieve(QWEN)
            assert one.owned_by == "vllm"
        await client.close()
    assert gpu.oom_count == 0


async def test_openai_sync_client_works_unchanged() -> None:
    async with two_backends() as (ep, gpu):
        assert ep.api_url is not None

        def chat() -> list[str]:
            client = openai.OpenAI(base_url=f"{ep.api_url}/v1", api_key="x", max_retries=0)
            with client:
                out = []
                for model in (LLAMA, QWEN):
                    r = client.chat.completions.create(model=model, messages=PROMPT)
                    out.append(r.choices[0].message.content or "")
                return out

        with anyio.fail_after(30):
            assert all(await anyio.to_thread.run_sync(chat))
    assert gpu.oom_count == 0


async def test_ollama_client_chat_generate_list_ps_embed_and_streaming() -> None:
    async with two_backends() as (ep, gpu):
        client = ollama.AsyncClient(host=ep.api_url)
        with anyio.fail_after(30):
            listed = await client.list()
            assert [m.model for m in listed.models] == [LLAMA]
            chat = await client.chat(model="llama3.2", messages=PROMPT)
            assert chat.message.content
            gen = await client.generate(model=LLAMA, prompt="hi")
            assert gen.response
            parts = [p.response async for p in await client.generate(LLAMA, "hi", stream=True)]
            assert len(parts) > 1
            chunks = [c async for c in await client.chat(LLAMA, messages=PROMPT, stream=True)]
            assert chunks[-1].done
            emb = await client.embed(model=LLAMA, input="hello")
            assert emb.embeddings and emb.embeddings[0]
            ps = await client.ps()
            assert [m.model for m in ps.models] == [LLAMA]
            # a vLLM request in between swaps Ollama out; the next Ollama call swaps it back
            async with httpx.AsyncClient(timeout=10) as http:
                r = await http.post(
                    ep.api_url + "/v1/completions", json={"model": QWEN, "prompt": "x"}
                )
                assert r.status_code == 200 and r.headers["x-gpubroker-backend"] == "vllm"
            assert (await client.ps()).models == []
            assert (await client.generate(model=LLAMA, prompt="hi")).response
            assert await swaps(ep) >= 2
            version = await client._request_raw("GET", "/api/version")
            assert version.json()["version"]
        await client._client.aclose()  # the client has no close() of its own
    assert gpu.oom_count == 0
