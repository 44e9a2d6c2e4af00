"""Waiting, visibly (issue 12): a streaming request that waits gets its head at once and SSE
comments, then the upstream's stream or an OpenAI-shaped error event; never a leaked lease.

Ollama and vLLM emulators on one 8 GiB GPU cannot both be resident: a request for the one that
is not waits for a swap (Ollama's unload and vLLM's wake are slowed to a second each), which is
what the comments tell. Two generic emulators do the same where a stream must break off.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import ollama
import openai
import pytest

from gpubroker.api.errors import ollama_error
from gpubroker.errors import QueueTimeout
from gpubroker.proxy.progress import AfterHead, Progress, opted_in, wants_events
from gpubroker.runtime import Endpoints
from gpubroker.sim import GenericEmulator, GiB, OllamaEmulator, SimGPU, VLLMEmulator, running
from gpubroker.testing import broker_running, make_config

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("broker_server")]

MODEL = "llama3.2:latest"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
ASK = {"x-gpubroker-progress": "1"}


async def no_leak(ep: Endpoints) -> None:
    """The broker holds no lease and no queue once the request is over (its release follows
    the response's last byte by a moment: waited for, bounded)."""
    assert ep.broker is not None
    sched = ep.broker.sched
    with anyio.fail_after(3):
        while ep.broker.live or any(s.active for s in sched.slots.values()):
            await anyio.sleep(0.02)
    assert sched.queue == []


@asynccontextmanager
async def vllm_behind_ollama(**vllm: Any) -> AsyncIterator[Endpoints]:
    """Ollama resident, vLLM asleep: a vLLM request waits ~2 s for Ollama's unload and its wake."""
    gpu = SimGPU(8 * GiB)
    v_emu = VLLMEmulator(gpu, "m", weights=4 * GiB, kv_cache=2 * GiB, wake_seconds=1.0)
    o_emu = OllamaEmulator(gpu, {MODEL: 6 * GiB}, unload_seconds=1.0)
    async with running(v_emu.app) as v, running(o_emu.app) as o:
        cfg = make_config(
            {
                "vllm": {"upstream": v, "unloadStrategy": "vllm", **vllm},
                "ollama": {"upstream": o, "unloadStrategy": "ollama"},
            },
            holdTime="100ms",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=30) as client:
            body = {"model": MODEL, "prompt": "hi", "stream": False}
            r = await client.post(ep.proxies["ollama"] + "/api/generate", json=body)
            assert r.status_code == 200
            await anyio.sleep(0.2)  # past the hold
            yield ep
            assert gpu.oom_count == 0


async def raw_stream(
    url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[httpx.Response, float, list[tuple[float, str]]]:
    """POST and read an event stream: the response, when its head came, and each line's time."""
    start = time.monotonic()
    lines: list[tuple[float, str]] = []
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", url, json=body, headers=headers) as r,
    ):
        head = time.monotonic() - start
        async for line in r.aiter_lines():
            if line:
                lines.append((time.monotonic() - start, line))
    return r, head, lines


async def test_the_openai_client_streams_through_the_comments() -> None:
    async with vllm_behind_ollama(progress="comments") as ep:
        client = openai.AsyncOpenAI(base_url=ep.proxies["vllm"] + "/v1", api_key="none")
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        await no_leak(ep)
    assert text.strip().startswith("The GPU is shared")


async def test_a_waiting_stream_gets_its_head_at_once_and_a_comment_a_second() -> None:
    async with vllm_behind_ollama() as ep:  # asked for per request, not by the config
        url = ep.proxies["vllm"] + "/v1/chat/completions"
        r, head, lines = await raw_stream(url, CHAT, ASK)
        await no_leak(ep)
    assert r.status_code == 200 and head < 0.5
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-gpubroker-progress"] == "comments"
    comments = [(t, line) for t, line in lines if line.startswith(":")]
    data = [(t, line) for t, line in lines if line.startswith("data: ")]
    swapping = [line for _, line in comments if line.startswith(": swapping ollama→vllm (")]
    assert len(swapping) >= 2, comments
    assert swapping[0].startswith(": swapping ollama→vllm (draining ollama)") or swapping[
        0
    ].startswith(": swapping ollama→vllm (unloading ollama)")
    assert any("(loading vllm)" in line for line in swapping)
    assert comments[0][0] < 0.5  # the first comment came with the head, long before the answer
    assert data[0][0] > 1.5
    said = [line for _, line in comments if line.startswith(": x-gpubroker-")]
    assert said[0].startswith(": x-gpubroker-queue-ms: ") and int(said[0].split()[-1]) > 1500
    assert said[1].startswith(": x-gpubroker-swap: ")
    assert all(t < data[0][0] for t, _ in comments)  # no comment inside the stream's events
    assert data[-1][1] == "data: [DONE]"
    tokens = [json.loads(line[6:]) for _, line in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in tokens).strip()


async def test_no_comments_when_admitted_at_once_or_not_streaming() -> None:
    async with vllm_behind_ollama(progress="comments") as ep, httpx.AsyncClient(timeout=30) as c:
        url = ep.proxies["vllm"] + "/v1/chat/completions"
        waited = await c.post(url, json={**CHAT, "stream": False}, headers=ASK)  # it waits
        await no_leak(ep)
        r, _, lines = await raw_stream(url, CHAT, ASK)  # vLLM resident now: at once
        await no_leak(ep)
    assert waited.status_code == 200 and "x-gpubroker-progress" not in waited.headers
    assert waited.headers["content-type"].startswith("application/json")
    assert (
        int(waited.headers["x-gpubroker-queue-ms"]) > 1500 and "x-gpubroker-swap" in waited.headers
    )
    assert r.status_code == 200 and "x-gpubroker-progress" not in r.headers
    assert r.headers["x-gpubroker-queue-ms"] == "0"
    assert not [line for _, line in lines if line.startswith(":")]
    assert lines[-1][1] == "data: [DONE]"


async def test_an_upstream_error_answer_after_the_head_is_an_openai_error_event() -> None:
    async with vllm_behind_ollama(progress="comments") as ep:
        url = ep.proxies["vllm"] + "/v1/chat/completions"
        r, _, lines = await raw_stream(url, {**CHAT, "model": "nope"}, {})
        await no_leak(ep)
        client = openai.AsyncOpenAI(base_url=ep.proxies["vllm"] + "/v1", api_key="none")
    assert r.status_code == 200 and r.headers["x-gpubroker-progress"] == "comments"
    assert lines[-1][1] == "data: [DONE]"
    error = json.loads(lines[-2][1][6:])["error"]
    assert error == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": "404",
    }
    await client.close()


@asynccontextmanager
async def ollama_behind_vllm() -> AsyncIterator[tuple[Endpoints, Callable[[], Awaitable[None]]]]:
    """vLLM resident, Ollama (``progress: comments``, on the api port too) to load: an Ollama
    request waits ~2 s for vLLM's sleep and Ollama's load. Yields the endpoints and a call that
    makes vLLM resident again, so the next Ollama request waits once more."""
    gpu = SimGPU(8 * GiB)
    v_emu = VLLMEmulator(gpu, "m", weights=4 * GiB, kv_cache=2 * GiB, sleep_seconds=1.0)
    o_emu = OllamaEmulator(gpu, {MODEL: 6 * GiB}, load_seconds=1.0)
    async with running(v_emu.app) as v, running(o_emu.app) as o:
        cfg = make_config(
            {
                "vllm": {"upstream": v, "unloadStrategy": "vllm"},
                "ollama": {"upstream": o, "unloadStrategy": "ollama", "progress": "comments"},
            },
            holdTime="100ms",
            apiPort=20100,
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=30) as client:

            async def to_vllm() -> None:
                body = {**CHAT, "stream": False}
                r = await client.post(ep.proxies["vllm"] + "/v1/chat/completions", json=body)
                assert r.status_code == 200
                await no_leak(ep)
                await anyio.sleep(0.2)  # past the hold

            await to_vllm()
            yield ep, to_vllm
            assert gpu.oom_count == 0


async def test_ollama_ndjson_streams_stay_ndjson_with_progress_on() -> None:
    # Ollama's /api/chat streams NDJSON (``stream`` true by default): never an event-stream
    # head and comments, through the proxy port or the api port; its /v1 still gets them.
    prompt = [{"role": "user", "content": "hi"}]
    async with ollama_behind_vllm() as (ep, to_vllm):
        assert ep.api_url is not None
        raw = []
        for base in (ep.proxies["ollama"], ep.api_url):
            body = {"model": MODEL, "messages": prompt, "stream": True}
            raw.append(await raw_stream(base + "/api/chat", body, {}))
            await no_leak(ep)
            await to_vllm()
            body.pop("stream")  # the default is a stream too
            raw.append(await raw_stream(base + "/api/chat", body, {}))
            await no_leak(ep)
            await to_vllm()
        chunks = []
        for base in (ep.proxies["ollama"], ep.api_url):
            client = ollama.AsyncClient(host=base)
            with anyio.fail_after(30):
                chunks.append([c async for c in await client.chat(MODEL, prompt, stream=True)])
            await client.close()
            await no_leak(ep)
            await to_vllm()
        sse, _, events = await raw_stream(ep.proxies["ollama"] + "/v1/chat/completions",
                                          {**CHAT, "model": MODEL}, {})  # fmt: skip
        await no_leak(ep)
    for r, _, lines in raw:
        assert r.status_code == 200, lines
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert "x-gpubroker-progress" not in r.headers
        assert int(r.headers["x-gpubroker-queue-ms"]) > 500  # it did wait
        parts = [json.loads(line) for _, line in lines]  # every line JSON: no comment
        assert parts[-1]["done"] is True and len(parts) > 1
    for stream in chunks:
        assert stream[-1].done and "".join(c.message.content or "" for c in stream).strip()
    assert sse.headers["x-gpubroker-progress"] == "comments"
    assert any(line.startswith(": swapping vllm→ollama") for _, line in events), events
    assert events[-1][1] == "data: [DONE]"


@asynccontextmanager
async def two_generics(**top: Any) -> AsyncIterator[tuple[Endpoints, GenericEmulator]]:
    """``a`` resident on an 8 GiB GPU; ``b`` (which cannot fit beside it) asks for comments."""
    gpu = SimGPU(8 * GiB)
    a = GenericEmulator(gpu, 6 * GiB, unload_seconds=1.0, token_interval=0.02, tokens=150)
    b = GenericEmulator(gpu, 6 * GiB, load_seconds=0.5, token_interval=0.01)
    async with running(a.app) as ua, running(b.app) as ub:
        gen = {"unloadStrategy": "generic", "unloadEndpoint": "/unload"}
        cfg = make_config(
            {"a": {"upstream": ua, **gen}, "b": {"upstream": ub, "progress": "comments", **gen}},
            **top,
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=30) as client:
            r = await client.post(ep.proxies["a"] + "/generate", json={"stream": False})
            assert r.status_code == 200
            yield ep, b
            assert gpu.oom_count == 0


async def test_an_upstream_dying_mid_stream_after_the_comments_ends_with_an_error_event() -> None:
    async with two_generics(holdTime="100ms") as (ep, _):
        await anyio.sleep(0.2)
        body = {"format": "sse", "stream": True, "tokens": 10, "crash_after": 3}
        r, _, lines = await raw_stream(ep.proxies["b"] + "/generate", body, {})
        await no_leak(ep)
    assert r.headers["x-gpubroker-progress"] == "comments"
    assert any(line.startswith(": swapping a→b") for _, line in lines)
    assert len([line for _, line in lines if '"token"' in line]) == 3
    assert lines[-1][1] == "data: [DONE]"
    error = json.loads(lines[-2][1][6:])["error"]
    assert error["type"] == "upstream_error" and error["code"] == "upstream_error"
    assert "upstream closed the stream early" in error["message"]


async def test_a_lease_refused_after_the_comments_ends_with_an_error_event() -> None:
    # a is busy streaming for 3 s: b's request waits in line through the hold, then for a to
    # drain, and times out first.
    async with two_generics(holdTime="1s", queueTimeout="1500ms") as (ep, _):
        async with anyio.create_task_group() as tg, httpx.AsyncClient(timeout=30) as client:

            async def busy() -> None:
                body = {"format": "sse", "tokens": 150}
                async with client.stream("POST", ep.proxies["a"] + "/generate", json=body) as r:
                    async for _ in r.aiter_bytes():
                        pass

            tg.start_soon(busy)
            await anyio.sleep(0.2)
            body = {"format": "sse", "stream": True}
            r, _, lines = await raw_stream(ep.proxies["b"] + "/generate", body, {})
            tg.cancel_scope.cancel()
        await no_leak(ep)
    assert r.status_code == 200
    queued = [line for _, line in lines if line.startswith(": queued 1st behind a, ")]
    assert queued, lines
    error = json.loads(lines[-2][1][6:])["error"]
    assert error["code"] == "queue_timeout" and error["type"] == "server_error"
    assert lines[-1][1] == "data: [DONE]"


# --- the pieces, without sockets ------------------------------------------------------------


def test_the_opt_in_and_what_counts_as_streaming() -> None:
    assert opted_in("comments", []) and not opted_in("off", [])
    assert opted_in("off", [(b"x-gpubroker-progress", b"1")])
    assert not opted_in("off", [(b"x-gpubroker-progress", b"0")])
    json_type = [(b"content-type", b"application/json")]
    chat = "/v1/chat/completions"
    assert wants_events([(b"accept", b"text/event-stream")], None, chat)
    assert wants_events(json_type, b'{"stream": true}', chat)
    assert not wants_events(json_type, b'{"stream": false}', chat)
    assert not wants_events(json_type, b"{not json", chat)
    assert not wants_events(json_type, None, chat)  # too big to read ahead: cannot tell
    assert not wants_events([(b"content-type", b"text/plain")], b'{"stream": true}', chat)
    # Ollama's own routes stream NDJSON: their body never asks for events; Accept still does
    for path in ("/api/chat", "/api/generate"):
        assert not wants_events(json_type, b'{"stream": true}', path)
        assert wants_events([(b"accept", b"text/event-stream")], None, path)


@pytest.mark.parametrize(
    ("status", "body", "message", "code"),
    [
        (503, b'{"error": "queue_timeout", "message": "waited", "backend": "b", "retryable": true}',
         "waited", "queue_timeout"),
        (400, b'{"error": "model required"}', "upstream answered 400: model required",
         "upstream_error"),
        (400, b'{"object": "error", "message": "too long", "type": "BadRequestError", "code": 400}',
         "too long", "400"),
        (500, b"Internal Server Error", "upstream answered 500: Internal Server Error",
         "upstream_error"),
        (200, b'{"id": 1}', 'the upstream answered with no event stream: {"id": 1}',
         "upstream_error"),
    ],
)  # fmt: skip
async def test_any_answer_after_the_head_becomes_one_error_event(
    status: int, body: bytes, message: str, code: str
) -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def never() -> bool:
        return False

    progress = Progress(send, never, lambda: None, "b")
    await progress.run()
    after = AfterHead(send, progress)
    await after({"type": "http.response.start", "status": status, "headers": []})
    await after({"type": "http.response.body", "body": body[:5], "more_body": True})
    await after({"type": "http.response.body", "body": body[5:], "more_body": False})
    assert after.finished and len(sent) == 1 and sent[0]["more_body"] is False
    event, done = sent[0]["body"].split(b"\n\n")[:2]
    assert done == b"data: [DONE]"
    error = json.loads(event[6:])["error"]
    assert (error["message"], error["code"]) == (message, code)


@dataclass(frozen=True)
class Said:
    """A scheduler's refusal, as ``Refused`` reads one."""

    backend: str
    status: int
    code: str
    message: str
    retry_after: float | None


async def test_a_broker_error_in_ollamas_shape_after_the_head_is_named_the_brokers() -> None:
    # The api port renders a queue timeout on /api/… as Ollama's {"error": "…"}: no code in
    # it, so the event must not blame the upstream; the renderer's wrapper keeps the code.
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def never() -> bool:
        return False

    progress = Progress(send, never, lambda: None, "ollama")
    await progress.run()
    after = AfterHead(send, progress)
    render = after.errors(ollama_error)
    refusal = Said("ollama", 503, "queue_timeout", "waited 1.5 s in line", 2.0)
    await render(after, QueueTimeout(refusal), "ollama")
    assert after.finished and len(sent) == 1
    event, done = sent[0]["body"].split(b"\n\n")[:2]
    assert done == b"data: [DONE]"
    error = json.loads(event[6:])["error"]
    assert error["code"] == "queue_timeout" and error["type"] == "server_error"
    assert error["message"] == "ollama: waited 1.5 s in line"
    assert "upstream" not in error["message"]
