"""running(): serve an app on loopback for the length of a block, then stop by itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import gpubroker.sim
from gpubroker.sim import StartupFailed, running

pytestmark = pytest.mark.anyio


async def hello(_request: Any) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def test_serves_until_the_block_ends() -> None:
    app = Starlette(routes=[Route("/", hello)])
    with anyio.fail_after(5):
        async with running(app) as url:
            assert url.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(trust_env=False) as client:
                assert (await client.get(url)).text == "hello"
        async with httpx.AsyncClient(trust_env=False) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(url)


async def test_a_failing_lifespan_raises_startup_failed() -> None:
    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        raise RuntimeError("no GPU for you")
        yield

    app = Starlette(routes=[Route("/", hello)], lifespan=lifespan)
    with anyio.fail_after(5), pytest.raises(StartupFailed, match="no GPU for you"):
        async with running(app):
            pytest.fail("the block must not run")


async def test_errors_in_the_block_come_out_unwrapped() -> None:
    app = Starlette(routes=[Route("/", hello)])
    with anyio.fail_after(5), pytest.raises(KeyError):
        async with running(app):
            raise KeyError("mine")


async def test_cancelled_block_still_stops_the_server() -> None:
    app = Starlette(routes=[Route("/", hello)])
    with anyio.fail_after(5):
        with anyio.move_on_after(0.05):
            async with running(app) as url:
                await anyio.sleep_forever()
        async with httpx.AsyncClient(trust_env=False) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(url)


def test_public_api() -> None:
    assert sorted(gpubroker.sim.__all__) == [
        "ComfyUIEmulator",
        "GenericEmulator",
        "GiB",
        "MiB",
        "NotStarted",
        "OllamaEmulator",
        "OutOfMemory",
        "SimGPU",
        "StartupFailed",
        "VLLMEmulator",
        "VLLMStartupError",
        "flux_workflow",
        "gpu_app",
        "running",
        "simple_workflow",
    ]
    for name in gpubroker.sim.__all__:
        assert getattr(gpubroker.sim, name) is not None
