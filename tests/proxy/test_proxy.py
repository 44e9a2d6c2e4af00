"""The proxy's own promises, against tiny upstreams: WebSocket close codes, timeouts, memory."""

from __future__ import annotations

import logging
import resource
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gpubroker.sim import GenericEmulator, GiB, SimGPU, running
from gpubroker.testing import broker_running, make_config

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("broker_server")]


def ws_upstream(seen: dict[str, Any]) -> Starlette:
    async def echo(ws: WebSocket) -> None:
        asked = ws.scope.get("subprotocols") or []
        await ws.accept(subprotocol="comfy" if "comfy" in asked else None)
        seen["query"] = ws.url.query
        seen.setdefault("headers", [(k.decode(), v.decode()) for k, v in ws.scope["headers"]])
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                seen["client_code"] = message.get("code")
                return
            if message.get("text") == "bye":
                await ws.close(code=4001, reason="server says bye")
                return
            if message.get("bytes") is not None:
                await ws.send_bytes(message["bytes"][::-1])
            else:
                await ws.send_text(message["text"].upper())

    return Starlette(routes=[WebSocketRoute("/ws", echo)])


async def test_websocket_text_binary_and_close_codes_both_ways() -> None:
    seen: dict[str, Any] = {}
    async with running(ws_upstream(seen)) as up:
        cfg = make_config({"svc": {"upstream": up, "unloadStrategy": "generic"}})
        async with broker_running(cfg) as ep:
            url = ep.proxies["svc"].replace("http://", "ws://") + "/ws?clientId=7"
            with anyio.fail_after(10):
                browser = {"Origin": "http://" + ep.proxies["svc"].removeprefix("http://")}
                async with connect(
                    url,
                    subprotocols=["comfy"],  # type: ignore[list-item]
                    additional_headers=browser,
                    user_agent_header="a-browser/1.0",
                ) as ws:
                    assert ws.subprotocol == "comfy"
                    await ws.send("hello")
                    assert await ws.recv() == "HELLO"
                    await ws.send(b"\x01\x02\x03")
                    assert await ws.recv() == b"\x03\x02\x01"
                    await ws.send("bye")
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.recv()
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4001
                assert closed.value.rcvd.reason == "server says bye"
                async with connect(url) as ws:
                    await ws.close(code=4002)
                while "client_code" not in seen:
                    await anyio.sleep(0.01)
            async with httpx.AsyncClient() as client:
                status = (await client.get(ep.status_url + "/")).json()
    assert seen["query"] == "clientId=7"
    # The handshake reaches the upstream as the browser sent it: its Host (so an Origin check
    # such as ComfyUI's sees Host and Origin agree), Origin and User-Agent, once each.
    names = [k for k, _ in seen["headers"]]
    headers = dict(seen["headers"])
    broker_host = ep.proxies["svc"].removeprefix("http://")
    assert names.count("host") == 1 and headers["host"] == broker_host
    assert headers["origin"] == "http://" + broker_host
    assert names.count("user-agent") == 1 and headers["user-agent"] == "a-browser/1.0"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-host"] == broker_host
    assert headers["x-forwarded-proto"] == "ws"
    # The upstream saw the close at once. Its code is not checked: Hypercorn (serving both the
    # broker and this upstream) hands an app 1006 for any close a peer starts, whatever its code.
    assert seen["client_code"] in (1000, 1006)
    assert status["totals"]["gpuRequests"] == 0  # websockets never take a lease


async def test_websocket_to_a_dead_upstream_is_refused_cleanly() -> None:
    cfg = make_config({"svc": {"upstream": "http://127.0.0.1:9", "unloadStrategy": "generic"}})
    async with broker_running(cfg) as ep:
        url = ep.proxies["svc"].replace("http://", "ws://") + "/ws"
        with anyio.fail_after(10), pytest.raises(Exception) as refused:
            async with connect(url):
                pass
    assert "403" in str(refused.value) or "1011" in str(refused.value)


async def test_upstream_that_never_answers_is_a_504_after_upstream_timeout() -> None:
    gpu = SimGPU(8 * GiB)
    gen = GenericEmulator(gpu, 1 * GiB)
    async with running(gen.app) as up:
        cfg = make_config({"gen": {"upstream": up, "unloadStrategy": "generic"}},
                          upstreamTimeout="300ms")  # fmt: skip
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            r = await client.post(ep.proxies["gen"] + "/generate", json={"delay": 5})
            status = (await client.get(ep.status_url + "/")).json()
    assert r.status_code == 504
    assert r.json()["error"] == "upstream_timeout" and r.json()["retryable"] is True
    assert status["totals"]["inFlight"] == 0


async def test_a_big_upload_and_download_pass_in_constant_memory(loopback) -> None:  # type: ignore[no-untyped-def]
    total = 256 * 2**20
    chunk = b"x" * 2**20

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-received", str(size).encode())]})  # fmt: skip
        # Only the proxied path streams: this upstream runs in the test's own process, so a
        # health probe's abandoned 256 MiB on "/" would count against the proxy's memory.
        if scope["path"] == "/u":
            for _ in range(total // len(chunk)):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def upload():  # type: ignore[no-untyped-def]
        for _ in range(total // len(chunk)):
            yield chunk

    async with loopback(app) as up:
        cfg = make_config(
            {"svc": {"upstream": up.url, "unloadStrategy": "generic"}}, telemetry="none"
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=60) as client:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            received = 0
            async with client.stream("POST", ep.proxies["svc"] + "/u", content=upload()) as r:
                async for part in r.aiter_raw():
                    received += len(part)
            grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert int(r.headers["x-received"]) == total and received == total
    assert grown_kib < 64 * 1024, f"peak memory grew {grown_kib} KiB for 512 MiB moved"


async def test_client_leaving_before_the_first_byte_ends_the_lease_at_once() -> None:
    gpu = SimGPU(8 * GiB)
    gen = GenericEmulator(gpu, 1 * GiB)
    async with running(gen.app) as up:
        cfg = make_config({"gen": {"upstream": up, "unloadStrategy": "generic"}})
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            with anyio.move_on_after(0.3):  # a non-streaming answer that takes 5 s to come
                await client.post(ep.proxies["gen"] + "/generate", json={"delay": 5})
            started = anyio.current_time()
            with anyio.fail_after(2):
                while (await client.get(ep.status_url + "/")).json()["totals"]["inFlight"]:
                    await anyio.sleep(0.02)
            released_after = anyio.current_time() - started
    assert released_after < 1.0  # not when the upstream would have answered


async def test_clients_leaving_silent_gpu_streams_end_their_leases_and_upstream_streams(
    loopback: Any,
) -> None:
    """After the first event the upstream goes quiet (a model thinking): each client that
    hangs up ends its lease and its upstream stream at once, not when the next event comes."""
    streams = 20
    disconnected: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):  # the request's body
            pass
        if scope["path"] != "/gen":  # the warm-up, and the broker's health probe
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        with anyio.move_on_after(30):  # the broker closing our connection ends this
            if (await receive())["type"] == "http.disconnect":
                disconnected.append(1)

    async with loopback(app) as up:
        cfg = make_config(
            {"svc": {"upstream": up.url, "unloadStrategy": "generic", "gpuPaths": ["POST /*"]}}
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as status:
            async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=50)) as c:
                # Resident first, so each stream is admitted at once, never queued: what
                # watches it is the stream's own watcher, not the queue's.
                (await c.post(ep.proxies["svc"] + "/warm")).raise_for_status()
                svc = (await status.get(ep.status_url + "/")).json()["backends"]["svc"]
                assert svc["state"] == "resident" and svc["active"] == 0

                async def one() -> None:
                    async with c.stream("POST", ep.proxies["svc"] + "/gen", json={}) as r:
                        async for chunk in r.aiter_raw():
                            assert chunk.startswith(b"data: 1")
                            return  # ... and hang up

                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        for _ in range(streams):
                            tg.start_soon(one)
            with anyio.fail_after(5):  # not the 30 s the upstream would stay quiet
                while (await status.get(ep.status_url + "/")).json()["totals"]["inFlight"]:
                    await anyio.sleep(0.02)
                while len(disconnected) < streams:
                    await anyio.sleep(0.02)


async def test_a_length_framed_body_cut_short_reaches_the_client_as_truncated(loopback) -> None:  # type: ignore[no-untyped-def]
    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"1000")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
        raise RuntimeError("upstream dies mid-body")

    async with loopback(app) as up:
        cfg = make_config({"svc": {"upstream": up.url, "unloadStrategy": "generic"}})
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(ep.proxies["svc"] + "/x")
            status = (await client.get(ep.status_url + "/")).json()
    assert status["backends"]["svc"]["upstreamErrors"] == 1


async def test_a_websocket_handshake_with_a_big_cookie_is_proxied() -> None:
    """A browser's Cookie header can pass 8 KiB on its own (many sites' cookies together); the
    head is within the 64 KiB bound, so the upgrade goes through under either server."""
    seen: dict[str, Any] = {}
    cookie = "session=" + "c" * 12_000
    async with running(ws_upstream(seen)) as up:
        cfg = make_config({"svc": {"upstream": up, "unloadStrategy": "generic"}})
        async with broker_running(cfg) as ep:
            url = ep.proxies["svc"].replace("http://", "ws://") + "/ws"
            with anyio.fail_after(10):
                async with connect(url, additional_headers={"Cookie": cookie}) as ws:
                    await ws.send("hello")
                    assert await ws.recv() == "HELLO"
    assert dict(seen["headers"])["cookie"] == cookie


async def test_a_stream_past_shutdown_grace_is_cut_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Stopping with a stream longer than ``shutdownGrace``: the stream is cut at the grace,
    and the broker says so without an error traceback per stream (a restart is routine)."""
    caplog.set_level(logging.WARNING)
    gpu = SimGPU(8 * GiB)
    gen = GenericEmulator(gpu, 2 * GiB, token_interval=0.05, tokens=400)  # 20 s of tokens
    lines: list[str] = []
    async with running(gen.app) as upstream:
        cfg = make_config(
            {"gen": {"upstream": upstream, "unloadStrategy": "generic"}}, shutdownGrace="1s"
        )
        async with httpx.AsyncClient(timeout=30) as client, anyio.create_task_group() as tg:

            async def read(url: str) -> None:
                try:
                    async with client.stream("POST", url, json={"format": "sse"}) as r:
                        async for line in r.aiter_lines():
                            lines.append(line)
                except httpx.HTTPError:
                    lines.append("cut")

            with anyio.fail_after(15):
                async with broker_running(cfg) as ep:
                    tg.start_soon(read, ep.proxies["gen"] + "/generate")
                    while len([x for x in lines if '"token"' in x]) < 2:
                        await anyio.sleep(0.02)
                while not lines or lines[-1] not in ("cut", "data: [DONE]"):
                    await anyio.sleep(0.02)
    assert len([x for x in lines if '"token"' in x]) < 400  # cut, not waited out
    noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]
