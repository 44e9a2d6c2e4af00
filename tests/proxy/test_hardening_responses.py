"""Hardening, response side: clients that leave or stall, upstreams that stall, break off or
send ambiguous framing. Real broker, real sockets; framing attacks over raw TCP."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import SocketStream

from gpubroker.sim import GenericEmulator, GiB, SimGPU, running
from gpubroker.testing import broker_running, make_config

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("broker_server")]

Respond = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


@asynccontextmanager
async def raw_upstream(respond: Respond) -> AsyncIterator[str]:
    """An upstream that writes whatever bytes ``respond(path, reader, writer)`` chooses.

    Each connection serves requests until it closes; ``/`` (the broker's health probe) gets an
    empty 200. The server and its handlers stop with the block.
    """
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if path == b"/":
                    writer.write(OK_EMPTY)
                    continue
                await respond(path, reader, writer)
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await server.wait_closed()


async def wait_eof(reader: asyncio.StreamReader, closed: list[bytes], path: bytes) -> None:
    """Wait (bounded) for the broker to close this upstream connection; note it in ``closed``."""
    with anyio.move_on_after(20):
        while await reader.read(4096):
            pass
        closed.append(path)


async def read_until_closed(stream: SocketStream) -> bytes:
    """Everything the server sends until it closes the connection (EOF or reset)."""
    data = b""
    try:
        while True:
            data += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
        return data


def hostport(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def status_of(client: httpx.AsyncClient, status_url: str) -> dict[str, Any]:
    return (await client.get(status_url + "/")).json()  # type: ignore[no-any-return]


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# --- 1. a client that leaves releases its upstream connection at once ---------------------


async def test_clients_leaving_a_slow_passthrough_close_their_upstream_connections(
    loopback: Any,
) -> None:
    leavers = 40
    arrived: list[int] = []
    disconnected: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()  # the (empty) request body
        if scope["path"] == "/slow":
            arrived.append(1)
            with anyio.move_on_after(30):  # the broker closing our connection ends this
                if (await receive())["type"] == "http.disconnect":
                    disconnected.append(1)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"ok"})

    async with loopback(app) as up:
        cfg = make_config(
            {"svc": {"upstream": up.url, "unloadStrategy": "generic"}},
            telemetry="none",
            shutdownGrace="1s",
        )
        async with broker_running(cfg) as ep:
            host, port = hostport(ep.proxies["svc"])
            clients = []
            with anyio.fail_after(15):
                for _ in range(leavers):
                    stream = await anyio.connect_tcp(host, port)
                    await stream.send(f"GET /slow HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
                    clients.append(stream)
                while len(arrived) < leavers:  # every request reached the upstream
                    await anyio.sleep(0.02)
                for stream in clients:  # ... and every client walks away
                    await stream.aclose()
            with anyio.fail_after(10):  # not upstreamTimeout (600 s) later
                while len(disconnected) < leavers:
                    await anyio.sleep(0.02)
            async with httpx.AsyncClient(timeout=10) as client:
                innocent = await client.get(ep.proxies["svc"] + "/fast")
    assert innocent.status_code == 200 and innocent.text == "ok"


# --- 2. an upstream that sends its head, then nothing: upstreamIdleTimeout ------------------


@pytest.mark.parametrize("kind", ["sse", "plain"])
async def test_a_stalled_response_body_ends_after_upstream_idle_timeout_and_frees_the_lease(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    closed: list[bytes] = []
    ctype = b"text/event-stream" if kind == "sse" else b"application/octet-stream"
    first = b'data: {"token": "a"}\n\n' if kind == "sse" else b"first bytes"

    async def respond(path: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"%x\r\n%b\r\n" % (ctype, len(first), first))  # fmt: skip
        await wait_eof(reader, closed, path)  # and never another byte

    caplog.set_level(logging.WARNING)
    async with raw_upstream(respond) as up:
        backend = {"upstream": up, "unloadStrategy": "generic", "gpuPaths": ["GET /gen"]}
        if kind == "sse":  # a backend's own value wins over the top level's
            backend["upstreamIdleTimeout"] = "500ms"
            cfg = make_config({"svc": backend}, telemetry="none", upstreamIdleTimeout="5m")
        else:  # the top level's applies to a backend that sets none
            cfg = make_config({"svc": backend}, telemetry="none", upstreamIdleTimeout="500ms")
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            received = b""
            with anyio.fail_after(10):
                async with client.stream("GET", ep.proxies["svc"] + "/gen") as r:
                    if kind == "sse":
                        async for part in r.aiter_raw():  # ends cleanly, after an error event
                            received += part
                    else:
                        with pytest.raises(httpx.RemoteProtocolError):  # aborted, not "complete"
                            async for part in r.aiter_raw():
                                received += part
                while not closed:  # the broker closed its upstream connection
                    await anyio.sleep(0.02)
            status = await status_of(client, ep.status_url)
    assert r.status_code == 200
    assert received.startswith(first)
    if kind == "sse":  # the stream's own error event, then its clean end
        events = [e for e in received.decode().split("\n\n") if e]
        error = json.loads(events[1].removeprefix("data: "))["error"]
        assert error["type"] == "upstream_error" and "no body byte for 0.5s" in error["message"]
        assert events[2] == "data: [DONE]"
    assert status["totals"]["inFlight"] == 0
    assert status["backends"]["svc"]["upstreamErrors"] == 1
    warnings = [r for r in caplog.records if r.name == "gpubroker.proxy.app"]
    assert len(warnings) == 1 and "no body byte" in warnings[0].getMessage()
    no_errors_logged(caplog)


# --- 3. an upstream that breaks off: no complete-looking wrong body -------------------------


@pytest.mark.parametrize("ctype", [b"text/plain", b"application/json", b"application/x-ndjson"])
async def test_an_upstream_breaking_off_a_chunked_body_aborts_the_client_connection(
    ctype: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    part = b'{"response": "partial"}\n'

    async def respond(path: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: %b\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"%x\r\n%b\r\n" % (ctype, len(part), part))  # fmt: skip
        await w.drain()
        w.transport.abort()  # dies mid-body: no terminating chunk

    caplog.set_level(logging.WARNING)
    async with raw_upstream(respond) as up:
        cfg = make_config({"svc": {"upstream": up, "unloadStrategy": "generic"}}, telemetry="none")
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            received = b""
            with anyio.fail_after(10):
                async with client.stream("GET", ep.proxies["svc"] + "/x") as r:
                    if ctype == b"application/x-ndjson":  # the stream's own error line, then end
                        async for chunk in r.aiter_raw():
                            received += chunk
                    else:
                        with pytest.raises(httpx.RemoteProtocolError):
                            async for chunk in r.aiter_raw():
                                received += chunk
            status = await status_of(client, ep.status_url)
    assert received.startswith(part)
    if ctype == b"application/x-ndjson":
        last = json.loads(received.splitlines()[-1])
        assert "upstream closed the stream early" in last["error"]
    else:
        assert received == part
    assert status["backends"]["svc"]["upstreamErrors"] == 1
    no_errors_logged(caplog)


async def test_an_http_1_0_client_gets_a_streamed_body_close_delimited_not_chunked(
    loopback: Any,
) -> None:
    """An HTTP/1.0 client does not know chunked coding (RFC 9112 §6.1: never sent to it): a
    body of unknown length goes to it as is, delimited by the connection's close."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})  # fmt: skip
        for part in (b'{"a": 1}\n', b'{"b": 2}\n'):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async with loopback(app) as up:
        cfg = make_config({"svc": {"upstream": up.url, "unloadStrategy": "generic"}})
        async with broker_running(cfg) as ep:
            host, port = hostport(ep.proxies["svc"])
            with anyio.fail_after(10):
                async with await anyio.connect_tcp(host, port) as stream:
                    await stream.send(b"GET /stream HTTP/1.0\r\n\r\n")
                    answer = await read_until_closed(stream)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200"
    assert b"transfer-encoding" not in head.lower()
    assert body == b'{"a": 1}\n{"b": 2}\n'


# --- 4. slow and stalled clients ------------------------------------------------------------


@pytest.mark.parametrize("port", ["proxy", "status"])
async def test_a_client_dribbling_its_request_head_is_cut_off_after_header_timeout(
    port: str,
) -> None:
    cfg = make_config(
        {"svc": {"upstream": "http://127.0.0.1:9", "unloadStrategy": "generic"}},
        telemetry="none",
        headerTimeout="1s",
    )
    async with broker_running(cfg) as ep:
        host, p = hostport(ep.proxies["svc"] if port == "proxy" else ep.status_url)
        closed = anyio.Event()
        async with await anyio.connect_tcp(host, p) as stream:

            async def dribble() -> None:
                await stream.send(b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ")
                try:
                    while not closed.is_set():  # a byte every 100 ms: never a whole head
                        await stream.send(b"a")
                        await anyio.sleep(0.1)
                except (anyio.BrokenResourceError, ConnectionError):
                    pass

            with anyio.fail_after(8):  # keep-alive would have held it for 15 s, Hypercorn's 75
                async with anyio.create_task_group() as tg:
                    tg.start_soon(dribble)
                    answer = await read_until_closed(stream)
                    closed.set()
    assert answer == b""  # cut off, nothing served


async def test_a_client_sending_only_blank_lines_is_cut_off_after_header_timeout() -> None:
    """Blank lines before a request line are skipped by the HTTP parsers (RFC 9112 §2.2), so no
    head ever begins; the connection must still not be held for ever by a byte at a time."""
    cfg = make_config(
        {"svc": {"upstream": "http://127.0.0.1:9", "unloadStrategy": "generic"}},
        telemetry="none",
        headerTimeout="1s",
    )
    async with broker_running(cfg) as ep:
        host, p = hostport(ep.proxies["svc"])
        closed = anyio.Event()
        async with await anyio.connect_tcp(host, p) as stream:

            async def dribble() -> None:
                try:
                    while not closed.is_set():
                        await stream.send(b"\r\n")
                        await anyio.sleep(0.2)
                except (anyio.BrokenResourceError, ConnectionError):
                    pass

            with anyio.fail_after(8):  # keep-alive alone would have cut it at 15 s
                async with anyio.create_task_group() as tg:
                    tg.start_soon(dribble)
                    answer = await read_until_closed(stream)
                    closed.set()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400 ")  # (h11 refuses them: fine too)


async def test_a_body_stalling_after_its_answer_went_out_is_not_held_for_ever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker answers some requests before reading their body (a refused loop: 508). A
    client that then stops sending the rest holds a connection nobody reads: the keep-alive
    bound must still close it."""
    from gpubroker.proxy import listener

    monkeypatch.setattr(listener, "KEEP_ALIVE_TIMEOUT", 1.0)
    cfg = make_config(
        {"svc": {"upstream": "http://127.0.0.1:9", "unloadStrategy": "generic"}},
        telemetry="none",
    )
    async with broker_running(cfg) as ep:
        host, p = hostport(ep.proxies["svc"])
        via = b", ".join([b"1.1 gpubroker"] * 10)
        with anyio.fail_after(8):
            async with await anyio.connect_tcp(host, p) as stream:
                await stream.send(
                    b"POST /x HTTP/1.1\r\nhost: x\r\nvia: " + via
                    + b"\r\ncontent-length: 100\r\n\r\n0123456789"
                )  # fmt: skip
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive()
                await stream.send(b"more bytes")  # after the answer, then nothing
                answer += await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 508 ")


async def test_a_client_closing_its_idle_connection_is_closed_at_once() -> None:
    cfg = make_config(
        {"svc": {"upstream": "http://127.0.0.1:9", "unloadStrategy": "generic"}}, telemetry="none"
    )
    async with broker_running(cfg) as ep:
        host, port = hostport(ep.status_url)
        with anyio.fail_after(5):  # not when the keep-alive timer fires
            async with await anyio.connect_tcp(host, port) as stream:
                await stream.send(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
                answer = b""
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive()
                assert answer.startswith(b"HTTP/1.1 200")
                await stream.send_eof()  # done with this keep-alive connection
                await read_until_closed(stream)


@pytest.mark.parametrize("path", ["/pass", "/gen"])
async def test_a_stalled_request_body_is_cut_off_after_client_idle_timeout(
    path: str, loopback: Any, caplog: pytest.LogCaptureFixture
) -> None:
    upstream_saw: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        with anyio.move_on_after(30):
            while (message := await receive())["type"] == "http.request":
                if not message.get("more_body"):
                    upstream_saw.append("whole body")
                    return
            upstream_saw.append(message["type"])

    caplog.set_level(logging.WARNING)
    async with loopback(app) as up:
        backend = {"upstream": up.url, "unloadStrategy": "generic", "gpuPaths": ["POST /gen"]}
        cfg = make_config({"svc": backend}, telemetry="none", clientIdleTimeout="1s")
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            host, port = hostport(ep.proxies["svc"])
            with anyio.fail_after(10):
                async with await anyio.connect_tcp(host, port) as stream:
                    await stream.send(
                        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n".encode()
                        + b"only ten.."  # and then nothing
                    )
                    answer = await read_until_closed(stream)
                while not upstream_saw:
                    await anyio.sleep(0.02)
            status = await status_of(client, ep.status_url)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"] == "request_timeout"
    assert upstream_saw == ["http.disconnect"]  # the half-sent body was never passed on whole
    assert status["totals"]["inFlight"] == 0
    no_errors_logged(caplog)


# --- 5. ambiguous upstream framing is refused -----------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Note: a\r\n X-Injected: evil\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Note: a\r\n\tmore\r\n\r\nok",
    ],
    ids=["length-and-chunked", "obs-fold-space", "obs-fold-tab"],
)
async def test_ambiguous_upstream_framing_is_a_502_and_closes_that_connection(
    head: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    closed: list[bytes] = []

    async def respond(path: bytes, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(head)
        await wait_eof(reader, closed, path)

    caplog.set_level(logging.WARNING)
    async with raw_upstream(respond) as up:
        cfg = make_config({"svc": {"upstream": up, "unloadStrategy": "generic"}}, telemetry="none")
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                r = await client.get(ep.proxies["svc"] + "/x")
                while b"/x" not in closed:
                    await anyio.sleep(0.02)
            status = await status_of(client, ep.status_url)
    assert r.status_code == 502
    assert r.json()["error"] == "bad_upstream_response" and r.json()["backend"] == "svc"
    assert "x-injected" not in r.headers
    assert closed.count(b"/x") == 1  # (the broker's health probe of "/" may close too)
    assert status["backends"]["svc"]["upstreamErrors"] == 1
    no_errors_logged(caplog)


async def test_a_body_stalling_while_queued_for_the_gpu_leaves_the_queue_with_a_408() -> None:
    gpu = SimGPU(8 * GiB)
    a = GenericEmulator(gpu, 5 * GiB, owner="a", token_interval=0.05, tokens=40)
    b = GenericEmulator(gpu, 5 * GiB, owner="b")
    async with running(a.app) as ua, running(b.app) as ub:
        cfg = make_config(
            {
                "a": {"upstream": ua, "unloadStrategy": "generic", "unloadEndpoint": "/unload"},
                "b": {"upstream": ub, "unloadStrategy": "generic", "unloadEndpoint": "/unload"},
            },
            holdTime="30s",
            clientIdleTimeout="500ms",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            host, port = hostport(ep.proxies["b"])
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(client.post, ep.proxies["a"] + "/generate", json={}))
                await anyio.sleep(0.2)  # a holds the GPU for ~2 s: b's request must queue
                with anyio.fail_after(10):
                    async with await anyio.connect_tcp(host, port) as stream:
                        await stream.send(
                            b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n{"
                        )  # and the rest never comes
                        answer = await read_until_closed(stream)
                    mid = await status_of(client, ep.status_url)
            after = await status_of(client, ep.status_url)
    assert answer.startswith(b"HTTP/1.1 408")
    assert mid["queueLength"] == 0 and mid["vramOwner"] == "a"  # left the queue, a unharmed
    assert after["totals"]["inFlight"] == 0
    assert b.loads == 0  # the stalled request never reached b
