"""The proxy's upstream client against real loopback servers.

Normal traffic goes to a Starlette app served by ``gpubroker.proxy.listener``; the odd cases
(chunked and close-delimited bodies, drops, silence, interim responses) to a raw asyncio server
whose handler each test writes byte by byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gpubroker.errors import UpstreamError, UpstreamTimeout
from gpubroker.proxy.upstream import Upstream, UpstreamResponse

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- helpers --------------------------------------------------------------------------------


async def fetch(
    upstream: Upstream,
    method: str = "GET",
    target: bytes = b"/",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: Any = None,
) -> tuple[UpstreamResponse, bytes]:
    response = await upstream.open(method, target, headers or [], body)
    try:
        data = b"".join([chunk async for chunk in response.body()])
    finally:
        await response.aclose()
    return response, data


@asynccontextmanager
async def client(url: str, **kwargs: Any) -> AsyncIterator[Upstream]:
    upstream = Upstream(url, **kwargs)
    try:
        yield upstream
    finally:
        await upstream.aclose()


@dataclass
class Raw:
    url: str
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)


@asynccontextmanager
async def raw_server(handle: Handler) -> AsyncIterator[Raw]:
    """A TCP server running ``handle(reader, writer)`` per connection; all closed on exit."""
    raw = Raw("")
    tasks: set[asyncio.Task[Any]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.append(writer)
        raw.connections += 1
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    raw.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        with anyio.fail_after(10):
            yield raw
    finally:
        server.close()
        for writer in writers:
            writer.close()
        with anyio.fail_after(5):
            await server.wait_closed()
            for task in list(tasks):
                await task


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body (Content-Length or chunked); None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        return head, b"".join(parts)
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head, await reader.readexactly(int(line.split(b":")[1]))
    return head, b""


def answering(*responses: bytes, keep_open: bool = True) -> Handler:
    """A handler answering the requests on one connection with ``responses`` in turn."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for response in responses:
            if await read_request(reader) is None:
                return
            writer.write(response)
            await writer.drain()
        if keep_open:
            await reader.read()  # until the client closes

    return handle


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


# --- normal traffic against Starlette --------------------------------------------------------


def starlette_app() -> Starlette:
    seen_ports: set[int] = set()
    first_chunk = anyio.Event()
    load = {"now": 0, "peak": 0}

    async def hello(request: Request) -> Response:
        assert request.client is not None
        seen_ports.add(request.client.port)
        load["now"] += 1
        load["peak"] = max(load["peak"], load["now"])
        await anyio.sleep(float(request.query_params.get("sleep", 0)))
        load["now"] -= 1
        return JSONResponse(
            {"path": request.url.path, "query": request.url.query, "ports": len(seen_ports)},
            headers={"X-Custom": "Yes"},
        )

    async def upload(request: Request) -> Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.stream():
            if chunk:
                first_chunk.set()
            digest.update(chunk)
            size += len(chunk)
        return JSONResponse(
            {
                "size": size,
                "sha256": digest.hexdigest(),
                "te": request.headers.get("transfer-encoding"),
                "cl": request.headers.get("content-length"),
            }
        )

    async def stream(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"data: {i}\n\n".encode()
                await anyio.sleep(0.01)

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(
        routes=[
            Route("/hello", hello),
            Route("/upload", upload, methods=["POST"]),
            Route("/stream", stream),
        ]
    )
    app.state.first_chunk = first_chunk
    app.state.load = load
    app.state.ports = seen_ports
    return app


async def test_get_passes_status_headers_and_body(loopback: Any) -> None:
    async with loopback(starlette_app()) as up, client(up.url) as upstream:
        response, data = await fetch(upstream, target=b"/hello?a=1&b=%20")
    assert response.status == 200
    assert (b"x-custom", b"Yes") in response.headers  # names lowercased, values untouched
    assert data == b'{"path":"/hello","query":"a=1&b=%20","ports":1}'


async def test_keep_alive_reuses_one_connection(loopback: Any) -> None:
    async with loopback(starlette_app()) as up, client(up.url) as upstream:
        for _ in range(5):
            _, data = await fetch(upstream, target=b"/hello")
    assert data.endswith(b'"ports":1}')


async def test_streamed_response_arrives_in_pieces(loopback: Any) -> None:
    async with loopback(starlette_app()) as up, client(up.url) as upstream:
        response = await upstream.open("GET", b"/stream", [], None)
        try:
            chunks = [chunk async for chunk in response.body()]
        finally:
            await response.aclose()
    assert b"".join(chunks) == b"".join(f"data: {i}\n\n".encode() for i in range(5))
    assert len(chunks) >= 2


async def test_chunked_upload_streams_without_buffering(loopback: Any) -> None:
    app = starlette_app()
    piece = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        yield piece
        digest.update(piece)
        with anyio.fail_after(5):  # the server has it before the rest exists
            await app.state.first_chunk.wait()
        for _ in range(7):
            yield piece
            digest.update(piece)

    async with loopback(app) as up, client(up.url) as upstream:
        response, data = await fetch(upstream, "POST", b"/upload", body=body())
    assert response.status == 200
    assert data == (
        b'{"size":8388608,"sha256":"%s","te":"chunked","cl":null}' % digest.hexdigest().encode()
    )


async def test_content_length_upload_is_sent_raw(loopback: Any) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b""
        yield b"world"

    async with loopback(starlette_app()) as up, client(up.url) as upstream:
        _, data = await fetch(
            upstream, "POST", b"/upload", [(b"content-length", b"11")], body=body()
        )
        expected = hashlib.sha256(b"hello world").hexdigest().encode()
    assert data == b'{"size":11,"sha256":"%s","te":null,"cl":"11"}' % expected


@pytest.mark.parametrize("max_idle", [2, 1])
async def test_pool_bounds_connections_in_use_and_idle(loopback: Any, max_idle: int) -> None:
    app = starlette_app()
    async with loopback(app) as up, client(up.url, max_connections=2, max_idle=max_idle) as u:
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(fetch, u, "GET", b"/hello?sleep=0.05")
        assert len(u._idle) == max_idle  # a connection beyond max_idle is closed, not kept
    assert app.state.load["peak"] == 2  # six requests, never more than two at once
    if max_idle == 2:  # room to keep both: every request reused one of the first two
        assert len(app.state.ports) == 2
    # (with max_idle 1, how many are replaced depends on whether two answers land together)


async def test_connect_error_says_unreachable() -> None:
    with anyio.fail_after(5):
        async with raw_server(answering()) as raw:
            url = raw.url
        async with client(url) as upstream:
            with pytest.raises(UpstreamError, match=r"127\.0\.0\.1:\d+ unreachable: "):
                await upstream.open("GET", b"/", [], None)


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="not an http"):
        Upstream("ftp://example.com")


# --- odd cases against a raw server ------------------------------------------------------------


async def test_request_head_is_written_as_given() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        assert request is not None
        seen.append(request[0])
        writer.write(OK)

    async with raw_server(handle) as raw, client(raw.url) as upstream:
        await fetch(upstream, "DELETE", b"/a%20b?x=1", [(b"X-Thing", b"1"), (b"x-thing", b"2")])
    host = raw.url.removeprefix("http://").encode()
    assert seen == [
        b"DELETE /a%20b?x=1 HTTP/1.1\r\nX-Thing: 1\r\nx-thing: 2\r\nhost: " + host + b"\r\n\r\n"
    ]


async def test_chunked_response_with_extensions_and_trailers_then_reuse() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    async with raw_server(answering(chunked, OK)) as raw, client(raw.url) as upstream:
        response, data = await fetch(upstream)
        assert (b"transfer-encoding", b"chunked") in response.headers
        assert data == b"hello 0123456789"
        _, again = await fetch(upstream)
    assert again == b"ok"
    assert raw.connections == 1


async def test_chunked_response_arriving_byte_by_byte() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        payload = (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        for i in range(len(payload)):
            writer.write(payload[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)
        await reader.read()

    async with raw_server(handle) as raw, client(raw.url) as upstream:
        _, data = await fetch(upstream)
    assert data == b"abcde"


async def test_chunks_arriving_while_the_consumer_is_busy_are_not_missed() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n")
        await asyncio.sleep(0.05)
        writer.write(b"1\r\nb\r\n0\r\n\r\n")  # the end, sent while the client is busy
        await reader.read()

    async with raw_server(handle) as raw, client(raw.url) as upstream:
        response = await upstream.open("GET", b"/", [], None)
        chunks = []
        try:
            with anyio.fail_after(2):
                async for chunk in response.body():
                    chunks.append(chunk)
                    await anyio.sleep(0.2)
        finally:
            await response.aclose()
    assert chunks == [b"a", b"b"]


async def test_close_delimited_body_is_read_to_the_end_and_not_reused() -> None:
    response = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end"
    async with raw_server(answering(response, keep_open=False)) as raw, client(raw.url) as up:
        assert (await fetch(up))[1] == b"until the end"
        assert (await fetch(up))[1] == b"until the end"
    assert raw.connections == 2


async def test_connection_close_is_not_reused() -> None:
    response = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answering(response)) as raw, client(raw.url) as upstream:
        await fetch(upstream)
        await fetch(upstream)
    assert raw.connections == 2


async def test_http10_without_keep_alive_is_not_reused() -> None:
    response = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answering(response, response)) as raw, client(raw.url) as upstream:
        await fetch(upstream)
        await fetch(upstream)
    assert raw.connections == 2


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nwo",
    ],
    ids=["content-length", "chunked"],
)
async def test_dropped_mid_body_raises(response: bytes) -> None:
    async with raw_server(answering(response, keep_open=False)) as raw, client(raw.url) as upstream:
        got = await upstream.open("GET", b"/", [], None)
        received = b""
        try:
            with pytest.raises(UpstreamError, match="broke off the response"):
                async for chunk in got.body():
                    received += chunk
        finally:
            await got.aclose()
    assert received in (b"only ten..", b"hello", b"hellowo")


async def test_silent_upstream_times_out() -> None:
    async with (
        raw_server(answering(b"")) as raw,
        client(raw.url, response_timeout=0.2) as upstream,
    ):
        with pytest.raises(UpstreamTimeout, match=r"within 0\.2s"):
            await upstream.open("GET", b"/", [], None)


async def test_buffered_body_is_there_only_when_whole() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    async with raw_server(answering(OK, chunked, OK)) as raw, client(raw.url) as upstream:
        small = await upstream.open("GET", b"/", [], None)
        assert small.buffered_body() == b"ok"
        assert [chunk async for chunk in small.body()] == []
        await small.aclose()
        streamed = await upstream.open("GET", b"/", [], None)
        assert streamed.buffered_body() is None
        assert [chunk async for chunk in streamed.body()] == [b"hi"]
        await streamed.aclose()
        assert (await fetch(upstream))[1] == b"ok"
    assert raw.connections == 1


async def test_cancelled_from_outside_closes_the_connection() -> None:
    async with raw_server(answering(b"")) as raw, client(raw.url) as upstream:
        with anyio.move_on_after(0.1) as scope:
            await upstream.open("GET", b"/", [], None)
        assert scope.cancelled_caught
        async with client(raw.url, response_timeout=0.05) as quick:
            with anyio.fail_after(5), pytest.raises(UpstreamTimeout):  # outer scope unharmed
                await quick.open("GET", b"/", [], None)
    assert not upstream._idle


async def test_interim_100_continue_is_skipped() -> None:
    response = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"

    async def body() -> AsyncIterator[bytes]:
        yield b"payload"

    headers = [(b"expect", b"100-continue"), (b"content-length", b"7")]
    async with raw_server(answering(response)) as raw, client(raw.url) as upstream:
        got, data = await fetch(upstream, "PUT", b"/", headers, body())
    assert (got.status, data) == (201, b"done")


@pytest.mark.parametrize(
    ("method", "response"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ],
)
async def test_responses_without_body_keep_the_connection(method: str, response: bytes) -> None:
    async with raw_server(answering(response, OK)) as raw, client(raw.url) as upstream:
        _, data = await fetch(upstream, method)
        assert data == b""
        assert (await fetch(upstream))[1] == b"ok"
    assert raw.connections == 1


async def test_bytes_pass_through_unchanged() -> None:
    gz = bytes.fromhex("1f8b08000000000000ff")  # a gzip header, not to be decoded
    response = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\n" + gz
    async with raw_server(answering(response)) as raw, client(raw.url) as upstream:
        got, data = await fetch(upstream, headers=[(b"accept-encoding", b"gzip")])
    assert data == gz
    assert (b"content-encoding", b"gzip") in got.headers


async def test_oversized_head_is_an_error() -> None:
    response = b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n"
    async with raw_server(answering(response)) as raw, client(raw.url) as upstream:
        with pytest.raises(UpstreamError, match="larger than 64 KiB"):
            await upstream.open("GET", b"/", [], None)


async def test_malformed_head_is_an_error() -> None:
    async with raw_server(answering(b"SPDY/9 whatever\r\n\r\n")) as raw, client(raw.url) as up:
        with pytest.raises(UpstreamError, match="malformed status line"):
            await up.open("GET", b"/", [], None)


def stale_after_first() -> Handler:
    """Answer the first request on a connection; on the second, close without a word."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await read_request(reader)

    return handle


async def test_stale_pooled_connection_is_retried_once_without_a_body() -> None:
    async with raw_server(stale_after_first()) as raw, client(raw.url) as upstream:
        await fetch(upstream)
        response, data = await fetch(upstream)
    assert (response.status, data) == (200, b"ok")
    assert raw.connections == 2


async def test_stale_pooled_connection_is_not_retried_once_a_body_was_sent() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"{}"

    async with raw_server(stale_after_first()) as raw, client(raw.url) as upstream:
        await fetch(upstream)
        with pytest.raises(UpstreamError, match="connection closed before the response"):
            await upstream.open("POST", b"/", [(b"content-length", b"2")], body())
    assert raw.connections == 1


async def test_abandoned_body_closes_the_connection() -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000
    answers = iter([big, OK])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answering(next(answers))(reader, writer)

    async with raw_server(handle) as raw, client(raw.url) as upstream:
        response = await upstream.open("GET", b"/", [], None)
        async for _ in response.body():
            break
        await response.aclose()
        assert (await fetch(upstream))[1] == b"ok"
    assert raw.connections == 2


async def test_aclose_closes_idle_connections() -> None:
    closed = anyio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answering(OK, keep_open=True)(reader, writer)
        closed.set()

    async with raw_server(handle) as raw:
        upstream = Upstream(raw.url)
        await fetch(upstream)
        await upstream.aclose()
        with anyio.fail_after(2):
            await closed.wait()


async def test_idle_connections_are_closed_when_they_expire_not_at_the_next_request() -> None:
    """A burst's connections go once idle for ``keepalive_expiry``: kept until some later
    request, a few of them would pin the memory the burst took."""
    closed: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answering(OK, OK, keep_open=True)(reader, writer)  # until the client closes
        closed.append(time.monotonic())

    async with raw_server(handle) as raw, client(raw.url, keepalive_expiry=2.0) as upstream:
        await asyncio.gather(*(fetch(upstream) for _ in range(3)))  # three connections
        assert raw.connections == 3
        await asyncio.sleep(1.0)
        assert (await fetch(upstream))[1] == b"ok"  # one is used again: its idle time restarts
        freed = time.monotonic()
        with anyio.fail_after(4):
            while len(closed) < 2:
                await asyncio.sleep(0.01)
        assert time.monotonic() - freed < 1.8  # the two unused ones, at their own expiry
        with anyio.fail_after(4):
            while len(closed) < 3:
                await asyncio.sleep(0.01)
        assert time.monotonic() - freed >= 1.95  # the reused one a full expiry after its use
        assert raw.connections == 3
