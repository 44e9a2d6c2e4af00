"""OllamaStrategy model by model, against the emulator over real HTTP: what a request needs,
which model it names, and freeing one model while the others stay."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from gpubroker.config.model import BackendConfig
from gpubroker.errors import StrategyFailed
from gpubroker.plugins.strategies.base import Demand, StrategyContext
from gpubroker.plugins.strategies.builtin import OllamaStrategy as FromBuiltin
from gpubroker.plugins.strategies.ollama import (
    NOTHING,
    OllamaStrategy,
    canonical_model,
    modelfile_options,
    unloads_only,
)
from gpubroker.plugins.strategies.ollama_sizing import RUNNER_RESERVE, batch_surcharge
from gpubroker.sim import GiB, OllamaEmulator, SimGPU, running
from gpubroker.sim.ollama_models import SimModel

pytestmark = pytest.mark.anyio

MiB = 1 << 20
LLAMA = "llama3.1:8b"
QWEN = "qwen3:4b"
EMBED = "nomic-embed-text:latest"
MODELS: dict[str, SimModel | int] = {
    LLAMA: SimModel(5 * GiB),
    QWEN: SimModel(3 * GiB, parameters={"num_ctx": 8192}),
    EMBED: SimModel(300 * MiB, capabilities=("embedding",)),
    "fixed:latest": 2 * GiB,
}


@asynccontextmanager
async def ollama(
    gpu: SimGPU | None = None,
    *,
    env: Mapping[str, str] | None = None,
    managed: bool = True,
    **kw: Any,
) -> AsyncIterator[tuple[OllamaEmulator, OllamaStrategy, httpx.AsyncClient]]:
    emu = OllamaEmulator(gpu or SimGPU(16 * GiB), MODELS, **kw)
    with anyio.fail_after(15):
        async with (
            running(emu.app) as url,
            httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as client,
        ):
            backend = BackendConfig(
                name="ollama",
                proxy_port=1,
                upstream=url,
                unload_strategy="ollama",
                command=("ollama", "serve") if managed else None,
                env=dict(env or {}),
            )
            s = OllamaStrategy(StrategyContext(backend=backend, client=client, unload_timeout=5))
            yield emu, s, client


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


async def ps(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in (await client.get("/api/ps")).json()["models"]}


def tolerance(need: int, allocated: int, batch: int) -> None:
    """The need never undercounts, and overcounts only by what the emulator does not model:
    the runner's CUDA context (NVML sees it, /api/ps does not) and Ollama's batch surcharge."""
    assert allocated <= need <= allocated + RUNNER_RESERVE + batch_surcharge(batch)


CHAT = [{"role": "user", "content": "hi"}]
BIG = {"num_ctx": 8192}
ROUTES = [
    ("/api/generate", {"prompt": "hi", "options": BIG}, 8192),
    ("/api/chat", {"messages": CHAT, "options": BIG}, 8192),
    ("/api/generate", {"prompt": "hi"}, 4096),
    ("/v1/chat/completions", {"messages": CHAT}, 4096),
    ("/v1/completions", {"prompt": "hi", "options": BIG}, 4096),  # options are not read there
]


@pytest.mark.parametrize(("path", "fields", "ctx"), ROUTES)
async def test_need_matches_what_the_runner_then_takes(
    path: str, fields: dict[str, Any], ctx: int
) -> None:
    async with ollama() as (emu, s, client):
        s.gpu_total = emu.gpu.total  # 16 GiB: the 4096 tier
        demand = await s.demand("POST", path, body(model="llama3.1:8b", **fields))
        assert demand is not None and demand.model == LLAMA and demand.need
        assert (await client.post(path, json={"model": LLAMA, **fields})).status_code == 200
        loaded = (await ps(client))[LLAMA]
        assert loaded["context_length"] == ctx
        tolerance(demand.need, loaded["size_vram"], 1024 if ctx > 4096 else 512)
        assert emu.gpu.held("ollama") == loaded["size_vram"]


@pytest.mark.parametrize("path", ["/api/embed", "/api/embeddings", "/v1/embeddings"])
async def test_embedding_routes_size_an_embedding_model(path: str) -> None:
    async with ollama(env={"OLLAMA_NUM_PARALLEL": "4"}, num_parallel=4) as (emu, s, client):
        s.gpu_total = emu.gpu.total
        fields = {"input": "x"} if path != "/api/embeddings" else {"prompt": "x"}
        demand = await s.demand("POST", path, body(model="nomic-embed-text", **fields))
        assert demand is not None and demand.model == EMBED and demand.need
        assert (await client.post(path, json={"model": EMBED, **fields})).status_code == 200
        tolerance(demand.need, (await ps(client))[EMBED]["size_vram"], 512)  # no surcharge


async def test_ollamas_env_is_read_only_from_a_managed_worker() -> None:
    env = {"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_KV_CACHE_TYPE": "q8_0"}
    fields = {"prompt": "hi", "options": {"num_ctx": 8192}}
    async with ollama(env=env, num_parallel=2, kv_cache_type="q8_0") as (_emu, s, client):
        demand = await s.demand("POST", "/api/generate", body(model=LLAMA, **fields))
        assert demand is not None and demand.need
        await client.post("/api/generate", json={"model": LLAMA, **fields})
        tolerance(demand.need, (await ps(client))[LLAMA]["size_vram"], 1024)
        managed = demand.need
    async with ollama(env=env, managed=False) as (_emu, s, _client):
        demand = await s.demand("POST", "/api/generate", body(model=LLAMA, **fields))
        assert demand is not None and demand.need and demand.need < managed  # 1 slot, f16


async def test_the_default_context_without_a_known_gpu() -> None:
    async with ollama() as (_emu, s, client):
        generate = body(model=LLAMA, prompt="hi")
        worst = await s.demand("POST", "/api/generate", generate)  # the largest tier, capped
        await client.post("/api/generate", json={"model": LLAMA, "prompt": "hi"})
        loaded = await s.demand("POST", "/api/generate", generate)  # the runner's context
        assert worst and loaded and worst.need and loaded.need
        assert loaded.need < worst.need
        tolerance(loaded.need, (await ps(client))[LLAMA]["size_vram"], 512)
    setting = {"OLLAMA_CONTEXT_LENGTH": "2048"}
    async with ollama(env=setting, context_length=2048) as (_emu, s, client):
        set_ctx = await s.demand("POST", "/api/generate", generate)
        await client.post("/api/generate", json={"model": LLAMA, "prompt": "hi"})
        assert set_ctx and set_ctx.need
        tolerance(set_ctx.need, (await ps(client))[LLAMA]["size_vram"], 512)


async def test_the_modelfile_num_ctx_is_the_default() -> None:
    async with ollama() as (emu, s, client):
        s.gpu_total = emu.gpu.total
        demand = await s.demand("POST", "/v1/chat/completions", body(model=QWEN, messages=[]))
        assert demand is not None and demand.need
        await client.post("/v1/chat/completions", json={"model": QWEN, "messages": []})
        assert (await ps(client))[QWEN]["context_length"] == 8192
        tolerance(demand.need, (await ps(client))[QWEN]["size_vram"], 1024)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[]",
        b'"llama3"',
        b"\xff\xfe",
        body(prompt="no model"),
        body(model=3),
        body(model=""),
        body(model="llama3:"),
    ],
)
async def test_bad_bodies_need_nothing(raw: bytes) -> None:
    # Ollama answers 400 ("model is required", a decode error) and loads nothing: no lease.
    async with ollama() as (emu, s, client):
        assert await s.demand("POST", "/api/generate", raw) == NOTHING == Demand(need=0)
        assert (await client.post("/api/generate", content=raw)).status_code >= 400
        assert emu.loads == 0


async def test_only_model_routes_make_a_demand() -> None:
    async with ollama() as (emu, s, _client):
        for method, path in [("GET", "/api/ps"), ("POST", "/api/show"), ("GET", "/api/generate")]:
            assert await s.demand(method, path, body(model=LLAMA)) is None
        got = await s.demand("POST", "/api/generate?x=1", body(model=LLAMA, prompt="hi"))
        assert got is not None and got.model == LLAMA
        assert emu.loads == 0  # sizing reads /api/tags and /api/show, it loads nothing


async def test_an_unload_request_needs_nothing_and_unknowns_stay_unknown() -> None:
    async with ollama() as (_emu, s, _client):
        for path, fields in [
            ("/api/generate", {"keep_alive": 0}),
            ("/api/generate", {"prompt": "", "keep_alive": "0s"}),
            ("/api/chat", {"messages": [], "keep_alive": 0.0}),
        ]:
            assert await s.demand("POST", path, body(model="llama3.1:8b", **fields)) == Demand(
                model=LLAMA, need=0
            )
        loads = await s.demand("POST", "/api/generate", body(model=LLAMA, keep_alive="5m"))
        assert loads and loads.need  # an empty prompt that keeps the model loads it
        # a model Ollama does not have: it answers 404 and loads nothing (no unit is made)
        assert await s.demand("POST", "/api/generate", body(model="nope", prompt="x")) == NOTHING
        fixed = await s.demand("POST", "/api/generate", body(model="fixed", prompt="x"))
        assert fixed == Demand(model="fixed:latest")  # /api/show names no layers: unknown


async def test_the_model_is_named_as_ollama_stores_it() -> None:
    async with ollama() as (_emu, s, client):
        got = await s.demand("POST", "/api/generate", body(model="Llama3.1:8B", prompt="x"))
        assert got is not None and got.model == LLAMA
        await client.post("/api/generate", json={"model": LLAMA, "prompt": "x"})
        assert set(await s.loaded_models() or {}) == {LLAMA}


async def test_a_failed_lookup_leaves_the_need_unknown() -> None:
    async with ollama() as (emu, s, _client):
        s.gpu_total = emu.gpu.total
        await s.demand("POST", "/api/generate", body(model=LLAMA, prompt="x"))  # cached
    # the emulator is gone: the cached model is still sized, another one cannot be
    cached = await s.demand("POST", "/api/generate", body(model=LLAMA, prompt="x"))
    assert cached is not None and cached.need
    assert await s.demand("POST", "/api/generate", body(model=QWEN, prompt="x")) == Demand(
        model=QWEN
    )


async def test_unload_model_frees_only_that_model() -> None:
    async with ollama(token_interval=0.02) as (emu, s, client):
        for model in (LLAMA, QWEN):
            await client.post("/api/generate", json={"model": model, "prompt": "x"})
        loaded = await s.loaded_models()
        listed = await ps(client)
        assert loaded == {name: m["size_vram"] for name, m in listed.items()}
        assert sum((loaded or {}).values()) == emu.gpu.held("ollama")
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: client.post("/api/generate", json={"model": LLAMA, "prompt": "x"})
            )
            with anyio.fail_after(5):
                while not emu.in_flight(LLAMA):
                    await anyio.sleep(0.005)
            with anyio.fail_after(5):
                await s.unload_model("llama3.1:8b")
            assert emu.in_flight(LLAMA) == 0  # returned only once its request had ended
        assert set(await s.loaded_models() or {}) == {QWEN}
        assert emu.gpu.held("ollama") == listed[QWEN]["size_vram"]
        await s.unload_model("nope")  # Ollama does not know it: nothing to free
        await s.unload_model(LLAMA)  # not loaded: done at once
        assert await s.resident() is True


async def test_unload_model_of_a_model_ollama_forgot_while_loaded_fails() -> None:
    async with ollama() as (emu, s, client):
        await client.post("/api/generate", json={"model": LLAMA, "prompt": "x"})
        del emu.models[LLAMA]  # `ollama rm` while it is loaded
        with pytest.raises(StrategyFailed, match="no longer knows"):
            await s.unload_model(LLAMA)


def test_the_strategy_is_still_importable_from_builtin() -> None:
    assert FromBuiltin is OllamaStrategy and OllamaStrategy.per_model


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("llama3", "llama3:latest"),
        ("llama3:8b", "llama3:8b"),
        ("library/llama3", "llama3:latest"),
        ("registry.ollama.ai/library/llama3:8b", "llama3:8b"),
        ("https://registry.ollama.ai/library/llama3", "llama3:latest"),
        ("user/model", "user/model:latest"),
        ("hf.co/bartowski/Qwen-GGUF:Q4_K_M", "hf.co/bartowski/Qwen-GGUF:Q4_K_M"),
        ("localhost:5000/team/model", "localhost:5000/team/model:latest"),
        ("Llama3", "Llama3:latest"),
        ("", None),
        ("llama3:", None),
        ("/llama3", None),
        (None, None),
        (["llama3"], None),
    ],
)
def test_canonical_names_follow_ollamas_parse_name(name: Any, canonical: str | None) -> None:
    assert canonical_model(name) == canonical


def test_unload_requests_and_modelfile_parameters() -> None:
    assert unloads_only("/api/generate", {"keep_alive": "0m0s"})
    assert not unloads_only("/api/generate", {"keep_alive": "0", "prompt": "x"})
    assert not unloads_only("/api/generate", {"keep_alive": False})
    assert not unloads_only("/api/generate", {"keep_alive": "1s"})
    assert not unloads_only("/api/generate", {})
    assert not unloads_only("/api/embed", {"keep_alive": 0})  # embed always loads
    text = f'{"num_ctx":<30} 8192\n{"stop":<30} "<|im_end|>"\n{"temperature":<30} 0.7'
    parsed = modelfile_options(text)
    assert parsed == {"num_ctx": "8192", "stop": '"<|im_end|>"', "temperature": "0.7"}
    assert modelfile_options(None) == {}


async def test_keys_are_matched_as_ollamas_go_decoder_does() -> None:
    # encoding/json matches a key to a field case-insensitively, the last one winning: this is
    # a generation, not an unload, and must get a lease like any other.
    async with ollama() as (_emu, s, _client):
        raw = b'{"model": "%s", "Prompt": "hi", "keep_alive": 0}' % LLAMA.encode()
        got = await s.demand("POST", "/api/generate", raw)
        assert got is not None and got.model == LLAMA and got.need
        upper = b'{"MODEL": "%s", "prompt": "", "Keep_Alive": 0}' % LLAMA.encode()
        assert await s.demand("POST", "/api/generate", upper) == Demand(model=LLAMA, need=0)
