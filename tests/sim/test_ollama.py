"""OllamaEmulator over real HTTP: the API facts a broker relies on (BACKENDS.md, section 1)."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import httpx
import pytest

from gpubroker.sim import GiB, OllamaEmulator, SimGPU, running
from gpubroker.sim.ollama import parse_keep_alive

pytestmark = pytest.mark.anyio

MODELS = {"llama3.2": 3 * GiB, "qwen3:4b": 2 * GiB, "nomic-embed-text": 1 * GiB}


@asynccontextmanager
async def ollama(
    gpu: SimGPU | None = None, models: dict[str, int] | None = None, **kwargs: Any
) -> AsyncIterator[tuple[OllamaEmulator, httpx.AsyncClient]]:
    emu = OllamaEmulator(gpu or SimGPU(16 * GiB), models or MODELS, **kwargs)
    with anyio.fail_after(10):
        async with (
            running(emu.app) as url,
            httpx.AsyncClient(base_url=url, trust_env=False) as client,
        ):
            yield emu, client


async def until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(3):
        while not predicate():
            await anyio.sleep(0.005)


async def ps(client: httpx.AsyncClient) -> dict[str, dict]:
    models = (await client.get("/api/ps")).json()["models"]
    return {m["name"]: m for m in models}


async def test_plain_routes() -> None:
    async with ollama() as (_emu, client):
        root = await client.get("/")
        assert (root.status_code, root.text) == (200, "Ollama is running")
        assert (await client.head("/")).status_code == 200
        assert "version" in (await client.get("/api/version")).json()
        tags = (await client.get("/api/tags")).json()["models"]
        assert [t["name"] for t in tags] == [
            "llama3.2:latest",
            "nomic-embed-text:latest",
            "qwen3:4b",
        ]
        assert tags[0]["size"] == 3 * GiB and tags[0]["details"]["format"] == "gguf"
        assert (await client.get("/api/ps")).json() == {"models": []}


async def test_unknown_model_is_404_on_every_route() -> None:
    async with ollama() as (emu, client):
        for path, body in [
            ("/api/generate", {"model": "nope", "prompt": "hi"}),
            ("/api/generate", {"model": "nope", "keep_alive": 0}),
            ("/api/chat", {"model": "nope", "messages": []}),
            ("/api/embed", {"model": "nope", "input": "x"}),
        ]:
            reply = await client.post(path, json=body)
            assert reply.status_code == 404
            assert reply.json() == {"error": "model 'nope' not found"}
        reply = await client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        assert reply.status_code == 404
        assert reply.json()["error"]["type"] == "not_found_error"
        assert emu.gpu.used == 0


async def test_generate_streams_ndjson_incrementally() -> None:
    async with ollama(token_interval=0.02) as (emu, client):
        body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 5}}
        async with client.stream("POST", "/api/generate", json=body) as reply:
            assert reply.headers["content-type"] == "application/x-ndjson"
            lines = reply.aiter_lines()
            first = json.loads(await anext(lines))
            # The first token arrives while the request is still in flight.
            assert first["done"] is False and first["response"]
            assert emu.in_flight("llama3.2") == 1
            rest = [json.loads(line) async for line in lines if line]
        assert len(rest) == 5
        final = rest[-1]
        assert final["done"] is True and final["done_reason"] == "stop"
        assert final["eval_count"] == 5 and final["load_duration"] > 0
        assert emu.in_flight("llama3.2") == 0
        assert emu.gpu.held("ollama", "llama3.2:latest") == 3 * GiB


async def test_stream_false_gives_one_object_and_chat_has_messages() -> None:
    async with ollama() as (_emu, client):
        reply = await client.post(
            "/api/generate", json={"model": "llama3.2", "prompt": "hi", "stream": False}
        )
        body = reply.json()
        assert body["done"] is True and body["response"].strip()
        assert "load_duration" in body  # this request loaded the model
        reply = await client.post(
            "/api/chat",
            json={"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]},
        )
        chunks = [json.loads(line) for line in reply.text.splitlines()]
        assert chunks[0]["message"]["role"] == "assistant"
        assert chunks[-1]["done"] is True
        assert "load_duration" not in chunks[-1]  # already loaded


async def test_empty_prompt_loads_and_ps_lists_the_model() -> None:
    async with ollama() as (emu, client):
        reply = await client.post("/api/generate", json={"model": "llama3.2"})
        assert reply.json()["done_reason"] == "load"
        reply = await client.post("/api/chat", json={"model": "qwen3:4b", "messages": []})
        body = reply.json()
        assert body["done_reason"] == "load" and body["message"]["content"] == ""
        models = await ps(client)
        assert set(models) == {"llama3.2:latest", "qwen3:4b"}
        entry = models["llama3.2:latest"]
        assert entry["size"] == entry["size_vram"] == 3 * GiB
        assert entry["context_length"] > 0 and entry["details"]["family"]
        expires = datetime.fromisoformat(entry["expires_at"])
        left = (expires - datetime.now().astimezone()).total_seconds()
        assert 290 < left <= 300  # default keep_alive: 5m
        assert emu.gpu.by_owner() == {"ollama": 5 * GiB}
        assert emu.loads == 2


async def test_keep_alive_zero_replies_at_once_but_unloads_after_in_flight_stream() -> None:
    async with ollama(token_interval=0.02, unload_seconds=0.2) as (emu, client):
        body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 10}}
        async with client.stream("POST", "/api/generate", json=body) as reply:
            lines = reply.aiter_lines()
            await anext(lines)
            with anyio.fail_after(0.5):  # not held up by the stream
                stop = await client.post(
                    "/api/generate", json={"model": "llama3.2", "keep_alive": 0}
                )
            assert stop.json()["done_reason"] == "unload"
            # Still listed, with expires_at in the past, and still in VRAM.
            entry = (await ps(client))["llama3.2:latest"]
            assert datetime.fromisoformat(entry["expires_at"]) <= datetime.now().astimezone()
            assert emu.gpu.held("ollama") == 3 * GiB
            remaining = [json.loads(line) async for line in lines if line]
        assert remaining[-1]["done"] is True  # the in-flight request was never aborted
        await until(lambda: emu.resident().get("llama3.2:latest") == "unloading")
        # ps asked during the unload answers once the runner is gone (sched.go loadedModels).
        assert await ps(client) == {}
        assert emu.gpu.used == 0
        assert emu.unloads == 1 and emu.gpu.oom_count == 0


async def test_keep_alive_zero_on_an_unloaded_model_is_a_no_op() -> None:
    async with ollama() as (emu, client):
        reply = await client.post("/api/generate", json={"model": "llama3.2", "keep_alive": 0})
        assert reply.json()["done_reason"] == "unload"
        assert emu.loads == 0


async def test_a_model_that_does_not_fit_runs_partly_on_the_cpu_instead_of_failing() -> None:
    gpu = SimGPU(4 * GiB)
    gpu.allocate("comfyui", 2 * GiB)
    async with ollama(gpu) as (emu, client):
        reply = await client.post("/api/generate", json={"model": "llama3.2", "prompt": "hi"})
        assert reply.status_code == 200  # sched.go load(requireFull=false): no refusal
        entry = (await ps(client))["llama3.2:latest"]
        assert (entry["size"], entry["size_vram"]) == (3 * GiB, 2 * GiB)
        assert gpu.oom_count == 0 and gpu.held("ollama") == 2 * GiB
        assert emu.cpu_offloads == 1


async def test_layers_demanded_on_the_gpu_oom_with_a_500() -> None:
    gpu = SimGPU(4 * GiB)
    gpu.allocate("comfyui", 2 * GiB)
    async with ollama(gpu) as (_emu, client):
        body = {"model": "llama3.2", "prompt": "hi", "options": {"num_gpu": 99}}
        reply = await client.post("/api/generate", json=body)
        assert reply.status_code == 500
        assert "out of memory" in reply.json()["error"]
        assert gpu.oom_count == 1
        assert await ps(client) == {}


async def test_num_gpu_zero_loads_on_the_cpu_only() -> None:
    async with ollama() as (emu, client):
        body = {"model": "llama3.2", "options": {"num_gpu": 0}}
        assert (await client.post("/api/generate", json=body)).json()["done_reason"] == "load"
        assert (await ps(client))["llama3.2:latest"]["size_vram"] == 0
        assert emu.gpu.used == 0 and emu.cpu_offloads == 0


async def test_evicts_idle_models_beyond_max_loaded() -> None:
    async with ollama(max_loaded=2) as (emu, client):
        for model in ("llama3.2", "nomic-embed-text", "qwen3:4b"):
            await client.post("/api/generate", json={"model": model})
        assert set(await ps(client)) == {"nomic-embed-text:latest", "qwen3:4b"}
        assert emu.unloads == 1


async def test_evicts_its_own_models_rather_than_oom() -> None:
    gpu = SimGPU(4 * GiB)
    async with ollama(gpu) as (emu, client):
        await client.post("/api/generate", json={"model": "llama3.2"})
        reply = await client.post("/api/generate", json={"model": "qwen3:4b"})
        assert reply.json()["done_reason"] == "load"
        assert set(await ps(client)) == {"qwen3:4b"}
        assert gpu.oom_count == 0 and gpu.by_owner() == {"ollama": 2 * GiB}
        assert emu.resident() == {"qwen3:4b": "loaded"}


async def test_evicts_its_own_model_when_the_new_one_needs_over_80_percent_of_free() -> None:
    gpu = SimGPU(8 * GiB)
    models = {"small": 3 * GiB, "big": 9 * GiB // 2}  # 4.5 GiB of the 5 GiB left
    async with ollama(gpu, models) as (emu, client):
        await client.post("/api/generate", json={"model": "small"})
        await client.post("/api/generate", json={"model": "big"})
        assert set(await ps(client)) == {"big:latest"}  # sched.go load(): predicted > 80% free
        assert emu.unloads == 1 and emu.cpu_offloads == 0


async def test_a_request_without_keep_alive_keeps_the_runners_session() -> None:
    async with ollama() as (_emu, client):
        await client.post("/api/generate", json={"model": "llama3.2", "keep_alive": -1})
        body = {"model": "llama3.2", "prompt": "hi", "stream": False}
        assert (await client.post("/api/generate", json=body)).status_code == 200
        # sched.go useLoadedRunner: a nil keep_alive leaves sessionDuration as it was.
        entry = (await ps(client))["llama3.2:latest"]
        assert datetime.fromisoformat(entry["expires_at"]).year > 2300


async def test_keep_alive_zero_during_a_stream_sticks_for_a_request_without_keep_alive() -> None:
    async with ollama(token_interval=0.02) as (emu, client):
        body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 5}}
        async with client.stream("POST", "/api/generate", json=body) as reply:
            lines = reply.aiter_lines()
            await anext(lines)
            await client.post("/api/generate", json={"model": "llama3.2", "keep_alive": 0})
            again = {"model": "llama3.2", "prompt": "more", "stream": False}
            assert (await client.post("/api/generate", json=again)).status_code == 200
            _ = [line async for line in lines]
        await until(lambda: emu.gpu.used == 0)  # session 0 stayed: unloaded once idle
        assert emu.unloads == 1


async def test_ps_does_not_list_a_model_that_is_still_loading() -> None:
    async with ollama(load_seconds=0.3) as (emu, client):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: client.post("/api/generate", json={"model": "llama3.2"}))
            await until(lambda: emu.resident() == {"llama3.2:latest": "loading"})
            assert await ps(client) == {}  # sched.go: activeLoading is not in s.loaded
        assert set(await ps(client)) == {"llama3.2:latest"}


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:11435", 200),  # the broker's own port: Ollama never looks at the port
        ("localhost:8080", 200),
        ("[::1]:9", 200),
        ("192.168.1.5:80", 200),
        ("gpu.internal:80", 200),
        ("box.local", 200),
        ("gpu.example.com:11435", 403),
        ("example.com", 403),
    ],
)
async def test_host_allow_list_checks_the_name_not_the_port(host: str, status: int) -> None:
    async with ollama() as (_emu, client):
        reply = await client.get("/api/tags", headers={"host": host})
        assert reply.status_code == status
        if status == 403:
            assert reply.content == b""  # gin AbortWithStatus: no body


async def test_origin_allow_list() -> None:
    async with ollama(origins=["https://app.example"]) as (_emu, client):

        async def get(origin: str, method: str = "GET") -> int:
            return (
                await client.request(method, "/api/tags", headers={"origin": origin})
            ).status_code

        assert await get("http://127.0.0.1:5173") == 200
        assert await get("http://localhost") == 200
        assert await get("https://app.example") == 200  # OLLAMA_ORIGINS
        assert await get("http://evil.example") == 403
        assert await get("http://127.0.0.1:5173", "OPTIONS") == 204  # preflight


async def test_keep_alive_needs_a_unit_like_go() -> None:
    async with ollama() as (emu, client):
        body = {"model": "llama3.2", "keep_alive": "300"}
        reply = await client.post("/api/generate", json=body)
        assert reply.status_code == 400
        assert reply.json() == {"error": 'time: missing unit in duration "300"'}
        assert emu.loads == 0


async def test_keep_alive_expiry_and_forever() -> None:
    async with ollama() as (emu, client):
        await client.post("/api/generate", json={"model": "llama3.2", "keep_alive": "100ms"})
        await client.post("/api/generate", json={"model": "qwen3:4b", "keep_alive": -1})
        forever = (await ps(client))["qwen3:4b"]
        assert datetime.fromisoformat(forever["expires_at"]).year > 2300
        assert list(await ps(client)) == ["qwen3:4b", "llama3.2:latest"]  # latest expiry first
        await until(lambda: "llama3.2:latest" not in emu.resident())
        assert emu.gpu.by_owner() == {"ollama": 2 * GiB}


async def test_concurrent_requests_share_one_load() -> None:
    async with ollama(load_seconds=0.1) as (emu, client):
        body = {"model": "llama3.2", "prompt": "x", "stream": False}

        async def ask() -> None:
            assert (await client.post("/api/generate", json=body)).status_code == 200

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(ask)
        assert emu.loads == 1 and emu.in_flight("llama3.2") == 0


async def test_mid_stream_error_is_a_last_error_line_on_a_200() -> None:
    async with ollama() as (_emu, client):
        body = {"model": "llama3.2", "prompt": "x", "options": {"sim_error_after": 2}}
        reply = await client.post("/api/generate", json=body)
        assert reply.status_code == 200
        lines = [json.loads(line) for line in reply.text.splitlines()]
        assert len(lines) == 3 and "error" in lines[-1]


async def test_embeddings() -> None:
    async with ollama() as (_emu, client):
        reply = await client.post("/api/embed", json={"model": "nomic-embed-text", "input": []})
        assert reply.json()["embeddings"] == []
        reply = await client.post(
            "/api/embed", json={"model": "nomic-embed-text", "input": ["a", "b"]}
        )
        vectors = reply.json()["embeddings"]
        assert len(vectors) == 2 and vectors[0] != vectors[1]
        reply = await client.post(
            "/api/embeddings", json={"model": "nomic-embed-text", "prompt": "a"}
        )
        assert reply.json()["embedding"] == vectors[0]
        reply = await client.post(
            "/v1/embeddings", json={"model": "nomic-embed-text", "input": "a"}
        )
        assert reply.json()["data"][0]["embedding"] == vectors[0]


async def test_openai_routes_stream_sse_ending_in_done() -> None:
    async with ollama() as (_emu, client):
        models = (await client.get("/v1/models")).json()
        assert models["object"] == "list" and "llama3.2:latest" in [m["id"] for m in models["data"]]
        body = {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        reply = await client.post("/v1/chat/completions", json=body)
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [e for e in reply.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks[0]["object"] == "chat.completion.chunk"
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
        reply = await client.post("/v1/completions", json={"model": "llama3.2", "prompt": "x"})
        body = reply.json()
        assert body["object"] == "text_completion" and body["choices"][0]["text"]


async def test_not_started_app_explains_itself() -> None:
    from gpubroker.sim import NotStarted

    emu = OllamaEmulator(SimGPU(GiB), MODELS)
    transport = httpx.ASGITransport(app=emu.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        with pytest.raises(NotStarted, match="lifespan"):
            await client.post("/api/generate", json={"model": "llama3.2"})


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (None, None),
        (0, 0.0),
        ("0", 0.0),
        (30, 30.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        (-1, math.inf),
        ("-1m", math.inf),
    ],
)
def test_parse_keep_alive(raw: object, seconds: float | None) -> None:
    assert parse_keep_alive(raw) == seconds


@pytest.mark.parametrize("raw", ["soon", "5x", "300", "", "-", True, [1], {"s": 1}])
def test_parse_keep_alive_rejects_garbage(raw: object) -> None:
    from gpubroker.sim.ollama import BadRequest

    with pytest.raises(BadRequest):
        parse_keep_alive(raw)
