"""``GET /events``: a real SSE client (httpx-sse) follows requests and swaps as they happen."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from gpubroker.events import EventBus, WireEvent, on_wire
from gpubroker.observe.sse import EventFeed
from gpubroker.sim import GenericEmulator, GiB, SimGPU, gpu_app, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio


def generic(url: str) -> dict[str, Any]:
    return {"upstream": url, "unloadStrategy": "generic", "unloadEndpoint": "/unload"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Probe(WireEvent):
    """An event of the test's own, to flood the stream with."""

    kind: ClassVar[str] = "test"
    n: int
    pad: str

    def detail(self) -> dict[str, Any]:
        return {"n": self.n, "pad": self.pad}


@dataclass(frozen=True, slots=True, kw_only=True)
class After(WireEvent):
    kind: ClassVar[str] = "after"


async def subscribed(bus: EventBus, count: int) -> None:
    """Wait until exactly ``count`` listeners are attached (SSE streams started or ended)."""
    with anyio.fail_after(5):
        while len(bus) != count:
            await anyio.sleep(0.01)


async def test_an_sse_client_follows_one_request_through_a_whole_swap() -> None:
    gpu = SimGPU(8 * GiB)
    a = GenericEmulator(gpu, 3 * GiB, owner="a")
    b = GenericEmulator(gpu, 3 * GiB, owner="b")
    async with running(a.app) as ua, running(b.app) as ub, running(gpu_app(gpu)) as g:
        cfg = make_config(
            {"a": generic(ua), "b": generic(ub)},
            telemetry="sim",
            telemetryUrl=g,
            telemetryInterval="100ms",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            everything: list[dict[str, Any]] = []
            followed: list[dict[str, Any]] = []
            names: list[str] = []

            async def follow(query: str, into: list[dict[str, Any]]) -> None:
                url = ep.status_url + "/events" + query
                async with aconnect_sse(client, "GET", url) as source:
                    assert source.response.headers["content-type"].startswith("text/event-stream")
                    async for sse in source.aiter_sse():
                        names.append(sse.event)
                        into.append(event := sse.json())
                        if event["event"] == "released" and event["backend"] == "b":
                            return

            assert ep.bus is not None
            baseline = len(ep.bus)
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(follow, "", everything)
                    tg.start_soon(follow, "?request=2", followed)  # leases count from 1
                    await subscribed(ep.bus, baseline + 2)
                    assert (await client.post(ep.proxies["a"] + "/generate", json={})).is_success
                    while (await client.get(ep.status_url + "/")).json()["backends"]["a"][
                        "measuredVram"
                    ] != 3 * GiB:
                        await anyio.sleep(0.05)
                    r = await client.post(ep.proxies["b"] + "/generate", json={})
                    assert r.status_code == 200
            await subscribed(ep.bus, baseline)  # closed streams leave no listener behind
    assert names[0] == everything[0]["event"]  # the SSE event name is the event's kind
    queued_b = next(e for e in everything if e["event"] == "queued" and e["backend"] == "b")
    assert queued_b["request"] == 2 and queued_b["position"] == 1
    kinds = [(e["event"], e["backend"]) for e in followed]
    assert kinds == [
        ("queued", "b"),
        ("swap_started", "b"),
        ("draining", "a"),
        ("unloading", "a"),
        ("freed", "a"),
        ("loading", "b"),
        ("swapped", "b"),
        ("admitted", "b"),
        ("first_byte", "b"),
        ("released", "b"),
    ]
    by = {e["event"]: e for e in followed}
    assert by["swap_started"]["requests"] == [2] and by["swap_started"]["victims"] == ["a"]
    assert {by[k]["swap"] for k in ("swap_started", "draining", "freed", "swapped")} == {
        by["swap_started"]["swap"]
    }
    assert by["freed"]["mib"] == 3072 and by["freed"]["measured"] is True
    assert by["swapped"]["evicted"] == ["a"] and by["swapped"]["unloadMs"] >= 0
    assert by["admitted"]["queueMs"] > 0
    request_times = [by[k]["elapsedMs"] for k in ("queued", "admitted", "first_byte", "released")]
    assert request_times == sorted(request_times) and request_times[0] < request_times[-1]
    assert all(e["request"] == 2 for e in followed if "request" in e)
    assert all("elapsedMs" in by[k] for k in ("draining", "unloading", "freed", "loading"))


async def test_a_slow_sse_reader_never_slows_the_broker() -> None:
    gpu = SimGPU(8 * GiB)
    a = GenericEmulator(gpu, 3 * GiB, owner="a")
    async with running(a.app) as ua:
        cfg = make_config({"a": generic(ua)}, telemetry="none")
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            bus = ep.bus
            assert bus is not None
            emitted: list[dict[str, Any]] = []
            bus.subscribe(on_wire(emitted.append))
            baseline = len(bus)
            async with client.stream("GET", ep.status_url + "/events") as stalled:
                await subscribed(bus, baseline + 1)
                # The reader reads nothing while ~2 MB of events go out: far more than the
                # socket buffers and the reader's feed hold together.
                started = time.perf_counter()
                for i in range(2000):
                    bus.publish(Probe(backend=None, n=i, pad="x" * 1000))
                emitting = time.perf_counter() - started
                with anyio.fail_after(5):  # the broker serves on meanwhile
                    for _ in range(5):
                        r = await client.post(ep.proxies["a"] + "/generate", json={})
                        assert r.status_code == 200
                # Now the reader catches up: it is told what it lost, then sees new events.
                seen: list[dict[str, Any]] = []
                with anyio.fail_after(10):
                    async for line in stalled.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        seen.append(json.loads(line[6:]))
                        if seen[-1]["event"] == "dropped":
                            bus.publish(After(backend=None))
                        elif seen[-1]["event"] == "after":
                            break
    assert emitting < 1.0  # 2000 pushes never waited for the reader
    dropped = [e["count"] for e in seen if e["event"] == "dropped"]
    assert len(dropped) == 1 and dropped[0] > 0
    delivered = [e for e in seen if e["event"] != "dropped"]
    sent = next(i for i, e in enumerate(emitted) if e["event"] == "after") + 1
    assert len(delivered) + dropped[0] == sent  # every event delivered or counted as lost
    order = [e["n"] for e in delivered if e["event"] == "test"]
    assert order == sorted(order) and order[0] == 0  # in order, oldest first


async def test_event_feed_drops_and_counts_rather_than_waiting() -> None:
    feed = EventFeed(capacity=4)
    for i in range(10):
        feed.push({"event": "x", "n": i})  # never blocks, never raises
    assert feed.dropped == 6
    got = [await feed.next(0.1) for _ in range(5)]
    assert [e["n"] for e in got[:4] if e] == [0, 1, 2, 3] and got[4] is None
    feed.close()
    feed.push({"event": "late"})  # a closed feed ignores pushes (the reader has gone)
