"""Who asks, everywhere a request is shown: status, ``/events``, ``/metrics`` (issue 12).

Through a backend's own proxy port the caller is what the client calls itself
(``X-GPUBroker-Client``), else its address; the api port passes an API key's name (and the
model) into the lease, which is what ``Broker.lease(caller=, model=)`` stands in for here.
A key never shows: not in status, events, metrics or the log.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from gpubroker.sim import GenericEmulator, GiB, SimGPU, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

SECRET = "sk-never-shown-0123456789abcdef"
KEYS = [{"name": "ci", "key": SECRET}]


def generic(url: str) -> dict[str, Any]:
    return {"upstream": url, "unloadStrategy": "generic", "unloadEndpoint": "/unload"}


async def test_status_and_events_show_who_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # every event is logged at debug: none may carry a key
    gpu = SimGPU(8 * GiB)
    a = GenericEmulator(gpu, 2 * GiB, owner="a", token_interval=0.05, tokens=6)
    async with running(a.app) as ua:
        cfg = make_config({"a": generic(ua)}, apiKeys=KEYS)
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            assert ep.bus is not None
            events: list[dict[str, Any]] = []
            seen_live: list[dict[str, Any]] = []
            raw: list[str] = []

            async def follow() -> None:
                async with aconnect_sse(client, "GET", ep.status_url + "/events") as source:
                    async for sse in source.aiter_sse():
                        raw.append(sse.data)
                        events.append(event := sse.json())
                        if event["event"] == "released" and event["request"] == 2:
                            return

            async def generate(headers: dict[str, str]) -> None:
                url = ep.proxies["a"] + "/generate"
                body = {"format": "sse"}
                async with client.stream("POST", url, json=body, headers=headers) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line and not seen_live:  # mid-stream: the lease is live
                            status = await client.get(ep.status_url + "/")
                            raw.append(status.text)
                            seen_live.extend(status.json()["liveRequests"])

            baseline = len(ep.bus)
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(follow)
                    while len(ep.bus) == baseline:
                        await anyio.sleep(0.01)
                    await generate({"X-GPUBroker-Client": "nightly-job"})
                    live_first = list(seen_live)
                    seen_live.clear()
                    await generate({})
            metrics = (await client.get(ep.status_url + "/metrics")).text
    [first] = live_first
    assert first["caller"] == "nightly-job" and first["model"] is None
    assert first["kind"] == "lease" and first["state"] == "active"
    [second] = seen_live
    assert second["caller"] == "127.0.0.1" and second["model"] is None
    steps = [e for e in events if e["event"] in ("queued", "admitted", "released", "left")]
    assert {e["event"] for e in steps} >= {"admitted", "released"}
    callers = {(e["request"], e["event"]): e["caller"] for e in steps}
    assert callers[(1, "admitted")] == callers[(1, "released")] == "nightly-job"
    assert callers[(2, "admitted")] == callers[(2, "released")] == "127.0.0.1"
    assert all("model" not in e for e in steps)  # not known on a proxy port: not sent
    first_bytes = [e for e in events if e["event"] == "first_byte"]
    assert first_bytes and all("caller" not in e for e in first_bytes)  # lease steps only
    for shown in (*raw, metrics, caplog.text):
        assert SECRET not in shown


async def test_metrics_count_requests_by_model_and_key_name_only() -> None:
    gpu = SimGPU(8 * GiB)
    a = GenericEmulator(gpu, 2 * GiB, owner="a")
    async with running(a.app) as ua:
        cfg = make_config({"a": generic(ua)}, apiKeys=KEYS)
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            assert ep.broker is not None
            url = ep.proxies["a"] + "/generate"
            spoof = {"X-GPUBroker-Client": "ci"}  # a key's name, claimed without the key
            for headers in ({"X-GPUBroker-Client": "nightly-job"}, {}, spoof):
                assert (await client.post(url, json={}, headers=headers)).status_code == 200
            # what the api port does for a keyed request that named a catalogue model
            async with ep.broker.lease("a", "/v1/chat/completions", caller="ci", model="m1"):
                pass
            async with ep.broker.lease("a", "/v1/embeddings", caller="ci"):
                pass
            await ep.broker.preload("a")  # the broker's own swap: no caller, not a request
            assert (await client.get(ep.proxies["a"] + "/health")).status_code == 200
            text = (await client.get(ep.status_url + "/metrics")).text
    found = {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gpubroker_api_requests_total"
    }
    assert found == {  # only the keyed request the api port let in counts under its key
        frozenset({"backend": "a", "model": "", "caller": "other"}.items()): 4,
        frozenset({"backend": "a", "model": "m1", "caller": "ci"}.items()): 1,
    }
    assert "nightly-job" not in text and "127.0.0.1" not in text  # never a label
    assert SECRET not in text
