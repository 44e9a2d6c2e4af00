"""OllamaEmulator with sized models, through the official ``ollama`` client over real HTTP:
a runner takes weights + KV cache at its context, a new num_ctx reloads it, and models are
freed one by one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import ollama
import pytest

from gpubroker.sim import GiB, OllamaEmulator, SimGPU, running
from gpubroker.sim.ollama_models import ModelShape, SimModel, needs_reload, runner_options

pytestmark = pytest.mark.anyio

MiB = 1 << 20
LLAMA = "llama3.1:8b"
QWEN = "qwen3:4b"
EMBED = "nomic-embed-text:latest"
# Llama 3.1 8B: 32 layers, 8 KV heads of 128 dims: 128 KiB of f16 cache per token.
KV_PER_TOKEN = 32 * 8 * (128 + 128) * 2


def models() -> dict[str, SimModel | int]:
    return {
        LLAMA: SimModel(5 * GiB),  # shape_for(5 GiB): Llama 3.1 8B
        QWEN: SimModel(3 * GiB, parameters={"num_ctx": 8192, "stop": ["<|im_end|>"]}),
        EMBED: SimModel(300 * MiB, capabilities=("embedding",)),
        "fixed:latest": 2 * GiB,
    }


@asynccontextmanager
async def served(
    gpu: SimGPU | None = None, entries: Mapping[str, SimModel | int] | None = None, **kw: Any
) -> AsyncIterator[tuple[OllamaEmulator, ollama.AsyncClient]]:
    emu = OllamaEmulator(gpu or SimGPU(16 * GiB), entries or models(), **kw)
    with anyio.fail_after(10):
        async with running(emu.app) as url, ollama.AsyncClient(host=url) as client:
            yield emu, client


async def ps(client: ollama.AsyncClient) -> dict[str, ollama.ProcessResponse.Model]:
    return {m.model or "": m for m in (await client.ps()).models}


def compute(batch: int, embedding: int = 4096, vocab: int = 128256) -> int:
    return 4 * batch * (embedding + vocab)


async def test_a_runner_takes_weights_plus_cache_at_the_tier_default_context() -> None:
    async with served(SimGPU(16 * GiB)) as (emu, client):  # under 23 GiB: num_ctx 4096
        await client.generate(LLAMA, "hi")
        entry = (await ps(client))[LLAMA]
        expected = 5 * GiB + 4096 * KV_PER_TOKEN + compute(512)
        assert entry.context_length == 4096
        assert entry.size == entry.size_vram == expected
        assert emu.gpu.held("ollama", LLAMA) == expected
        tags = {m.model: m.size for m in (await client.list()).models}
        assert tags[LLAMA] == 5 * GiB  # /api/tags: the weights only


@pytest.mark.parametrize(("total", "ctx"), [(24 * GiB, 32768), (48 * GiB, 131072)])
async def test_the_default_context_grows_with_the_vram(total: int, ctx: int) -> None:
    # 48 GiB: the 262144 tier, capped at Llama 3.1's trained 131072
    async with served(SimGPU(total)) as (_emu, client):
        await client.generate(LLAMA, "hi")
        assert (await ps(client))[LLAMA].context_length == ctx


async def test_context_length_setting_and_modelfile_num_ctx_beat_the_tier() -> None:
    async with served(SimGPU(80 * GiB), context_length=2048) as (_emu, client):
        await client.generate(LLAMA, "hi")
        await client.generate(QWEN, "hi")  # PARAMETER num_ctx 8192
        loaded = await ps(client)
        assert (loaded[LLAMA].context_length, loaded[QWEN].context_length) == (2048, 8192)


async def test_a_new_num_ctx_reloads_with_a_bigger_cache() -> None:
    async with served() as (emu, client):
        await client.generate(LLAMA, "hi")
        small = (await ps(client))[LLAMA]
        await client.generate(LLAMA, "hi", options={"num_ctx": 4096})  # what it has: kept
        await client.generate(LLAMA, "hi")
        assert (emu.loads, emu.reloads) == (1, 0)
        await client.generate(LLAMA, "hi", options={"num_ctx": 16384})
        big = (await ps(client))[LLAMA]
        assert (emu.loads, emu.unloads, emu.reloads) == (2, 1, 1)
        assert big.context_length == 16384
        assert (big.size_vram or 0) - (small.size_vram or 0) == (
            12288 * KV_PER_TOKEN + compute(1024) - compute(512)
        )
        # an explicit num_ctx is not automatic: a request without one now reloads too
        await client.generate(LLAMA, "hi")
        assert (emu.reloads, (await ps(client))[LLAMA].context_length) == (2, 4096)
        assert emu.gpu.held("ollama") == small.size_vram


async def test_a_num_ctx_over_the_trained_length_is_the_trained_length() -> None:
    async with served() as (emu, client):
        await client.generate(LLAMA, "hi", options={"num_ctx": 131072})
        await client.generate(LLAMA, "hi", options={"num_ctx": 500000})
        assert (await ps(client))[LLAMA].context_length == 131072
        assert emu.reloads == 0


async def test_a_reload_waits_for_the_requests_on_the_old_runner() -> None:
    async with served(token_interval=0.02) as (emu, client):
        chunks = []
        async with anyio.create_task_group() as tg:
            stream = await client.generate(LLAMA, "hi", stream=True, options={"num_predict": 10})

            async def drain() -> None:
                async for chunk in stream:
                    chunks.append(chunk)

            tg.start_soon(drain)
            with anyio.fail_after(5):
                while not emu.in_flight(LLAMA):
                    await anyio.sleep(0.005)
            await client.generate(LLAMA, "hi", options={"num_ctx": 8192})
        assert len(chunks) == 11 and chunks[-1].done  # the old runner was not cut short
        assert emu.reloads == 1 and (await ps(client))[LLAMA].context_length == 8192


async def test_other_runner_options_reload_too_but_num_gpu_minus_one_does_not() -> None:
    async with served() as (emu, client):
        await client.generate(LLAMA, "hi")
        await client.generate(LLAMA, "hi", options={"num_gpu": -1, "temperature": 0.1})
        assert emu.reloads == 0
        await client.generate(LLAMA, "hi", options={"num_batch": 256})
        await client.generate(LLAMA, "hi", options={"num_batch": 256, "num_thread": 4})
        assert emu.reloads == 2
        await client.generate("fixed", "hi", options={"num_ctx": 8192})
        await client.generate("fixed", "hi", options={"num_ctx": 2048})
        assert emu.reloads == 3  # a fixed footprint reloads the same way, at the same size
        assert (await ps(client))["fixed:latest"].size_vram == 2 * GiB


async def test_keep_alive_zero_frees_one_model_and_keeps_the_other() -> None:
    async with served() as (emu, client):
        await client.generate(LLAMA, "hi")
        await client.generate(QWEN, "hi")
        qwen_bytes = (await ps(client))[QWEN].size_vram
        reply = await client.generate(LLAMA, keep_alive=0)
        assert reply.done_reason == "unload"
        with anyio.fail_after(5):
            while LLAMA in await ps(client):
                await anyio.sleep(0.005)
        assert set(await ps(client)) == {QWEN}
        assert emu.gpu.held("ollama", LLAMA) == 0
        assert emu.gpu.held("ollama") == qwen_bytes


async def test_show_lists_the_architecture_and_parameters() -> None:
    async with served() as (_emu, client):
        show = await client.show(QWEN)
        info = show.modelinfo or {}
        assert info["general.architecture"] == "llama"
        assert info["llama.block_count"] == 28 and info["llama.attention.head_count_kv"] == 8
        assert info["llama.attention.key_length"] == info["llama.attention.value_length"] == 128
        assert info["llama.embedding_length"] == 3072
        assert info["llama.context_length"] == 131072
        assert info["tokenizer.ggml.tokens"] is None  # arrays elided, as without verbose
        lines = (show.parameters or "").splitlines()
        assert lines == [f"{'num_ctx':<30} 8192", f'{"stop":<30} "<|im_end|>"']
        fixed = await client.show("fixed")
        assert "llama.block_count" not in (fixed.modelinfo or {})
        assert (await client.show(EMBED)).capabilities == ["embedding"]


async def test_an_embedding_model_runs_one_slot_and_a_q8_cache_is_smaller() -> None:
    qwen = SimModel(3 * GiB)
    async with served(entries={EMBED: models()[EMBED], QWEN: qwen}, num_parallel=4) as (
        _emu,
        client,
    ):
        await client.embed(EMBED, "x")
        embed = (await ps(client))[EMBED]
        shape = ModelShape(block_count=16, embedding_length=2048, key_length=64, value_length=64)
        kv = shape.block_count * 4096 * 8 * (64 + 64) * 2  # one slot of 4096 cells
        assert embed.size_vram == 300 * MiB + kv + compute(2048, 2048)  # batch min(2048, ctx)
    async with served(entries={QWEN: qwen}, kv_cache_type="q8_0") as (_emu, client):
        await client.generate(QWEN, "hi")
        q8 = (await ps(client))[QWEN].size_vram or 0
    async with served(entries={QWEN: qwen}) as (_emu, client):
        await client.generate(QWEN, "hi")
        f16 = (await ps(client))[QWEN].size_vram or 0
    kv_f16 = 28 * 4096 * 8 * 256 * 2
    assert f16 - q8 == kv_f16 - kv_f16 * 34 // 64


async def test_num_ctx_reaches_the_embed_routes() -> None:
    emu = OllamaEmulator(SimGPU(16 * GiB), models())
    with anyio.fail_after(10):
        async with (
            running(emu.app) as url,
            httpx.AsyncClient(base_url=url) as http,
            ollama.AsyncClient(host=url) as client,
        ):
            await client.embed(EMBED, "x", options={"num_ctx": 1024})
            assert (await ps(client))[EMBED].context_length == 1024
            body = {"model": EMBED, "prompt": "x", "options": {"num_ctx": 2048}}
            assert (await http.post("/api/embeddings", json=body)).status_code == 200
            assert (await ps(client))[EMBED].context_length == 2048 and emu.reloads == 1


def test_reload_rules_follow_needs_reload() -> None:
    entry = SimModel(5 * GiB)

    def opts(**o: Any) -> Any:
        return runner_options(entry, o, default_ctx=4096, parallel=1)

    assert not needs_reload(opts(), opts())
    assert not needs_reload(opts(), opts(num_ctx=4096))  # equal after the explicit value
    assert needs_reload(opts(num_ctx=4096), opts(num_ctx=8192))
    assert not needs_reload(opts(num_gpu=10), opts())  # -1: whatever it was loaded with
    assert needs_reload(opts(), opts(num_gpu=0))
    assert needs_reload(opts(), opts(main_gpu=1)) and needs_reload(opts(), opts(use_mmap=False))
    assert opts(num_ctx=1).num_ctx == 4 and opts(num_ctx=10**6).num_ctx == 131072
