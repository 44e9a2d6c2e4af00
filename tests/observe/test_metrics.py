"""``GET /metrics`` after real traffic, read back with prometheus-client's own parser."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpubroker.sim import GenericEmulator, GiB, SimGPU, gpu_app, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample as ``{(name, labels): value}``."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[Any, float], metric: str, /, **labels: str) -> float | None:
    return found.get((metric, frozenset(labels.items())))


async def test_metrics_count_requests_swaps_refusals_failures_and_the_gpu() -> None:
    gpu = SimGPU(16 * GiB, name="Sim 16G")
    a = GenericEmulator(gpu, 10 * GiB, owner="a")
    b = GenericEmulator(gpu, 10 * GiB, owner="b")
    async with (
        running(a.app) as ua,
        running(b.app) as ub,
        running(gpu_app(gpu)) as g,
    ):

        def generic(url: str, vram: str) -> dict[str, Any]:
            return {"upstream": url, "unloadStrategy": "generic", "unloadEndpoint": "/unload",
                    "vram": vram}  # fmt: skip

        cfg = make_config(
            {
                "a": generic(ua, "10GiB"),
                "b": generic(ub, "10GiB"),
                "huge": generic("http://127.0.0.1:9", "20GiB"),  # bigger than the card
            },
            policy="budget",
            minResidency=0,
            telemetry="sim",
            telemetryUrl=g,
            telemetryInterval="100ms",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            # a's first request frees what might hold memory (nobody can tell at start-up):
            # b, and huge, whose unload fails (its service is down). Then b evicts a.
            for name in ("a", "b"):
                r = await client.post(ep.proxies[name] + "/generate", json={})
                assert r.status_code == 200, r.text
            await client.get(ep.proxies["a"] + "/health")  # not GPU work: passthrough
            refused = await client.post(ep.proxies["huge"] + "/generate", json={})
            assert refused.status_code == 507
            with anyio.fail_after(5):
                while True:
                    r = await client.get(ep.status_url + "/metrics")
                    found = samples(r.text)
                    measured = value(found, "gpubroker_backend_vram_measured_bytes", backend="b")
                    down = value(found, "gpubroker_warnings", code="backend_down")
                    if down == 1 and measured == 10 * GiB:  # a sample since b loaded
                        break
                    await anyio.sleep(0.05)
    assert r.headers["content-type"].startswith("text/plain; version=")
    gpu0 = {"gpu": "0", "uuid": gpu.uuid, "name": "Sim 16G"}
    assert value(found, "gpubroker_gpu_memory_total_bytes", **gpu0) == 16 * GiB
    assert value(found, "gpubroker_gpu_memory_used_bytes", **gpu0) == 10 * GiB  # b
    assert value(found, "gpubroker_gpu_utilization_ratio", **gpu0) is None  # unknown: left out
    assert value(found, "gpubroker_telemetry_up") == 1
    assert value(found, "gpubroker_requests_total", backend="a", kind="gpu") == 1
    assert value(found, "gpubroker_requests_total", backend="a", kind="passthrough") == 1
    assert value(found, "gpubroker_requests_total", backend="huge", kind="gpu") == 0
    assert value(found, "gpubroker_oom_avoided_total", backend="huge") == 1
    assert value(found, "gpubroker_refusals_total", backend="huge") == 1
    assert value(found, "gpubroker_unload_failures_total", backend="huge") == 1
    assert value(found, "gpubroker_unload_failures_total", backend="a") == 0
    assert value(found, "gpubroker_swaps_total") == 2
    for phase in ("drain", "unload", "load", "total"):
        assert value(found, "gpubroker_swap_duration_seconds_count", phase=phase) == 2
    unload_s = value(found, "gpubroker_swap_duration_seconds_sum", phase="unload")
    assert unload_s is not None and 0 < unload_s < 5
    assert value(found, "gpubroker_queue_wait_seconds_count", backend="b") == 1
    assert value(found, "gpubroker_first_byte_seconds_count", backend="b") == 1
    assert value(found, "gpubroker_queue_length") == 0
    assert value(found, "gpubroker_backend_state", backend="b", state="resident") == 1
    assert value(found, "gpubroker_backend_state", backend="a", state="absent") == 1
    assert value(found, "gpubroker_backend_vram_declared_bytes", backend="a") == 10 * GiB
    assert value(found, "gpubroker_backend_vram_measured_bytes", backend="b") == 10 * GiB
    assert value(found, "gpubroker_backend_up", backend="huge") == 0
    owner_b = {"gpu": "0", "pid": str(gpu.pid("b")), "owner": "b"}
    assert value(found, "gpubroker_gpu_process_memory_bytes", **owner_b) == 10 * GiB
