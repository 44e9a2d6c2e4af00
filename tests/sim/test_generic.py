"""GenericEmulator over real HTTP: load/unload on demand and the fault switches."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from gpubroker.sim import GenericEmulator, GiB, SimGPU, running

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def generic(
    gpu: SimGPU | None = None, graceful_timeout: float = 1.0, **kwargs: Any
) -> AsyncIterator[tuple[GenericEmulator, httpx.AsyncClient]]:
    emu = GenericEmulator(gpu or SimGPU(8 * GiB), 3 * GiB, **kwargs)
    with anyio.fail_after(10):
        async with (
            running(emu.app, graceful_timeout=graceful_timeout) as url,
            httpx.AsyncClient(base_url=url, trust_env=False) as client,
        ):
            yield emu, client


async def test_generate_loads_on_demand_and_streams_sse() -> None:
    async with generic() as (emu, client):
        assert (await client.get("/status")).json()["loaded"] is False
        reply = await client.post("/generate", json={"prompt": "hi", "tokens": 3})
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [e for e in reply.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert [json.loads(e[6:])["index"] for e in events[:-1]] == [0, 1, 2]
        assert (await client.get("/status")).json() == {
            "loaded": True,
            "state": "loaded",
            "inflight": 0,
        }
        assert emu.gpu.by_owner() == {"generic": 3 * GiB}
        assert (await client.get("/health")).json() == {"status": "ok"}


async def test_ndjson_and_non_streaming() -> None:
    async with generic() as (_emu, client):
        reply = await client.post("/generate", json={"format": "ndjson", "tokens": 2})
        lines = [json.loads(line) for line in reply.text.splitlines()]
        assert [line["done"] for line in lines] == [False, False, True]
        reply = await client.post("/generate", json={"stream": False, "tokens": 2})
        assert reply.json()["tokens"] == 2


async def test_unload_and_load_routes() -> None:
    async with generic() as (emu, client):
        assert (await client.post("/load")).json() == {"loaded": True}
        assert (await client.post("/load")).json() == {"loaded": True}
        assert emu.loads == 1
        assert (await client.post("/unload")).json() == {"loaded": False}
        assert (await client.post("/unload")).json() == {"loaded": False}
        assert emu.unloads == 1 and emu.gpu.used == 0


async def test_crash_mid_stream_aborts_the_connection() -> None:
    async with generic() as (emu, client):
        received = []
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/generate", json={"crash_after": 3}) as reply:
                assert reply.status_code == 200
                async for line in reply.aiter_lines():
                    if line:
                        received.append(line)
        assert len(received) == 3
        assert emu.inflight == 0
        # The service itself survives.
        assert (await client.post("/generate", json={"tokens": 1})).status_code == 200


async def test_delay_hangs_before_the_first_byte() -> None:
    async with generic() as (_emu, client):
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/generate", json={"delay": 0.3}, timeout=0.1)


async def test_unload_hang_until_released() -> None:
    async with generic(unload_hang=True, graceful_timeout=0.2) as (emu, client):
        await client.post("/load")
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/unload", timeout=0.1)
        assert emu.loaded
        emu.unload_hang = False  # the hung unload (its client gone) now goes ahead
        with anyio.fail_after(2):
            while emu.state != "absent":
                await anyio.sleep(0.005)
        assert emu.gpu.used == 0 and emu.unloads == 1


async def test_unload_while_streaming_is_a_counted_fault() -> None:
    async with generic(token_interval=0.02) as (emu, client):
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/generate", json={"tokens": 20}) as reply:
                lines = reply.aiter_lines()
                await anext(lines)
                await client.post("/unload")
                async for _ in lines:
                    pass
        assert emu.unload_with_inflight == 1


async def test_oom_on_load() -> None:
    gpu = SimGPU(4 * GiB)
    gpu.allocate("vllm", 2 * GiB)
    async with generic(gpu) as (emu, client):
        reply = await client.post("/generate", json={})
        assert reply.status_code == 500 and "CUDA out of memory" in reply.json()["error"]
        assert (await client.post("/load")).status_code == 500
        assert gpu.oom_count == 2 and emu.state == "absent"
