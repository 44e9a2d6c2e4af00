"""Deadlines set between requests (idle timeout, minimum residency) fire on their own."""

from __future__ import annotations

import anyio
import httpx
import pytest

from gpubroker.sim import GenericEmulator, GiB, SimGPU, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio


def generic(url: str, **extra: object) -> dict[str, object]:
    return {"upstream": url, "unloadStrategy": "generic", "unloadEndpoint": "/unload", **extra}


async def test_idle_timeout_unloads_with_no_further_traffic() -> None:
    gpu = SimGPU(24 * GiB)
    a = GenericEmulator(gpu, 4 * GiB, owner="a")
    async with running(a.app) as ua:
        cfg = make_config(
            {"a": generic(ua, vram="4GiB", idleTimeout="300ms")},
            policy="budget",
            gpus=[{"id": 0, "memory": "24GiB"}],
            telemetry="none",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            await client.post(ep.proxies["a"] + "/generate", json={"stream": False})
            assert a.loaded
            with anyio.fail_after(3):  # nothing else happens: the broker's own clock must act
                while (status := (await client.get(ep.status_url + "/")).json())["backends"]["a"][
                    "state"
                ] != "absent":
                    await anyio.sleep(0.05)
    assert a.unloads == 1
    assert status["backends"]["a"]["state"] == "absent"


async def test_minimum_residency_expiry_admits_the_waiter_without_new_traffic() -> None:
    gpu = SimGPU(24 * GiB)
    a = GenericEmulator(gpu, 16 * GiB, owner="a", load_seconds=0.2)
    b = GenericEmulator(gpu, 16 * GiB, owner="b")
    async with running(a.app) as ua, running(b.app) as ub:
        cfg = make_config(
            {"a": generic(ua, vram="16GiB"), "b": generic(ub, vram="16GiB")},
            policy="budget",
            gpus=[{"id": 0, "memory": "24GiB"}],
            minResidency="500ms",
            queueTimeout="20s",
            telemetry="none",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=30) as client:
            await client.post(ep.proxies["a"] + "/generate", json={"stream": False})
            started = anyio.current_time()
            r = await client.post(ep.proxies["b"] + "/generate", json={"stream": False})
            waited = anyio.current_time() - started
    assert r.status_code == 200
    assert waited < 3.0  # residency (0.5 s) + unload + load; not the 20 s queue timeout
    assert gpu.oom_count == 0
