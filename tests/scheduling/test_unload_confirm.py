"""After an unload the broker believes telemetry, not the service's word."""

from __future__ import annotations

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gpubroker.sim import GenericEmulator, GiB, SimGPU, gpu_app, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio


def liar(gpu: SimGPU, size: int) -> Starlette:
    """Loads on /generate; /unload answers 200 and frees nothing (a leaking service)."""

    async def generate(request: Request) -> JSONResponse:
        if not gpu.held("liar"):
            gpu.allocate("liar", size)
        return JSONResponse({"ok": True})

    async def unload(request: Request) -> JSONResponse:
        return JSONResponse({"loaded": False})

    return Starlette(
        routes=[Route("/generate", generate, methods=["POST"]),
                Route("/unload", unload, methods=["POST"])]
    )  # fmt: skip


async def test_a_victim_that_keeps_its_memory_is_not_loaded_over() -> None:
    gpu = SimGPU(16 * GiB)
    other = GenericEmulator(gpu, 10 * GiB, owner="other")
    async with (
        running(liar(gpu, 10 * GiB)) as ul,
        running(other.app) as uo,
        running(gpu_app(gpu)) as g,
    ):
        backend = {"unloadStrategy": "generic", "unloadEndpoint": "/unload"}
        cfg = make_config(
            {"liar": {"upstream": ul, **backend}, "other": {"upstream": uo, **backend}},
            telemetry="sim",
            telemetryUrl=g,
            telemetryInterval="100ms",
            unloadTimeout="300ms",
            queueTimeout="1500ms",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            assert (await client.post(ep.proxies["liar"] + "/generate")).status_code == 200
            with anyio.fail_after(3):  # telemetry has seen what liar holds
                while not (await client.get(ep.status_url + "/")).json()["backends"]["liar"][
                    "measuredVram"
                ]:
                    await anyio.sleep(0.05)
            r = await client.post(ep.proxies["other"] + "/generate", json={"stream": False})
            with anyio.fail_after(3):  # the last try to free it ends; nobody waits any more
                while (status := (await client.get(ep.status_url + "/")).json())["swapping"]:
                    await anyio.sleep(0.05)
    assert r.status_code == 503  # it waited and timed out: loading it would have OOMed
    assert gpu.oom_count == 0 and other.loads == 0
    assert status["backends"]["liar"]["state"] == "resident"
