"""The request side hardened: what reaches an upstream is what the broker classified and framed.

Each test writes the bad bytes itself over a raw socket (a client library would refuse to send
them) to a real broker, whose upstream is a tiny ASGI app that records every request it parses.
Every test also checks that the broker logged no error and no traceback for the client's bad
request (the ``no_tracebacks`` fixture).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import posixpath
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpubroker.errors import BadTarget
from gpubroker.plugins.classifiers.builtin import OllamaClassifier
from gpubroker.proxy.forwarding import MAX_HOPS, VIA
from gpubroker.proxy.target import MAX_HEAD, normalise, route_variants
from gpubroker.runtime import Endpoints
from gpubroker.sim import running
from gpubroker.testing import broker_running, make_config

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("broker_server")]

# uvicorn's httptools parser refuses some malformed requests itself, before the app, with this
# plain-text 400 (where Hypercorn's h11 passes them to the proxy, which answers in JSON)
PARSER_400 = b"Invalid HTTP request received."


def refused_by_parser(server: str, response: Any) -> bool:
    return server == "uvicorn" and response.status == 400 and response.body == PARSER_400


def no_http2(server: str) -> None:
    if server == "uvicorn":
        pytest.skip("uvicorn speaks no HTTP/2")


Headers = list[tuple[bytes, bytes]]


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A client's bad request must never leave an error or a traceback in the log."""
    caplog.set_level(logging.INFO)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


# --- the upstream: records every request as it parsed it -------------------------------------


@dataclass
class Seen:
    method: str
    target: bytes  # the path as sent, plus ?query
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


HEALTH = b"/-health-probe"


class Recorder:
    """An ASGI upstream that answers 200 to everything and keeps what it got."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope["query_string"]
        target = scope["raw_path"] + (b"?" + query if query else b"")
        if target != HEALTH:  # the broker's own health probe is not a client's request
            self.seen.append(Seen(scope["method"], target, list(scope["headers"]), body))
        payload = json.dumps({"ok": True, "got": len(body)}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def targets(self) -> list[bytes]:
        return [s.target for s in self.seen]


@asynccontextmanager
async def broker_for(
    classifier: str = "generic", **top: Any
) -> AsyncIterator[tuple[Recorder, Endpoints]]:
    """A broker with one backend ``svc`` in front of a fresh Recorder."""
    rec = Recorder()
    async with running(rec) as up:
        spec = {"upstream": up, "unloadStrategy": "generic", "classifier": classifier}
        spec["healthPath"] = HEALTH.decode()
        async with broker_running(make_config({"svc": spec}, **top)) as ep:
            yield rec, ep


# --- a raw HTTP/1.1 client ---------------------------------------------------------------------


@dataclass
class Response:
    status_line: bytes
    headers: Headers
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    headers = [
        (k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines[1:])
    ]
    response = Response(lines[0], headers, b"")
    length = response.header(b"content-length")
    if response.status < 200 or response.status in (204, 304):
        return response
    if length is not None:
        response.body = await reader.readexactly(int(length))
    elif response.header(b"transfer-encoding") == b"chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            response.body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    else:
        response.body = await reader.read()
    return response


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


@asynccontextmanager
async def connection(
    url: str,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*host_port(url), limit=2**20)
    try:
        yield reader, writer
    finally:
        writer.close()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await writer.wait_closed()
            except OSError:  # pragma: no cover - reset by the peer
                pass


async def exchange(url: str, request: bytes) -> Response:
    """Write ``request`` in one piece on a new connection and read one response."""
    with anyio.fail_after(10):
        async with connection(url) as (reader, writer):
            writer.write(request)
            await writer.drain()
            return await read_response(reader)


def post(target: bytes, body: bytes = b"{}", *extra: bytes) -> bytes:
    lines = [b"POST " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join([*lines, *extra, b"", b""]) + body


def get(target: bytes, *extra: bytes) -> bytes:
    return b"\r\n".join([b"GET " + target + b" HTTP/1.1", b"Host: 127.0.0.1", *extra, b"", b""])


# --- 1. framing: the body forwarded is the body the headers describe ---------------------------


async def test_cl_te_request_is_refused_and_its_hidden_request_never_runs(
    broker_server: str,
) -> None:
    """CL.TE smuggling: a passthrough GET carrying a POST /generate the upstream would run."""
    hidden = post(b"/generate", b'{"prompt": "no lease"}')
    body = b"AAAA" + hidden
    smuggling = (
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    )
    async with broker_for() as (rec, ep):
        url = ep.proxies["svc"]
        with anyio.fail_after(10):
            async with connection(url) as (reader, writer):
                writer.write(smuggling)
                await writer.drain()
                refused = await read_response(reader)
                assert await reader.read() == b""  # and the connection is closed after it
        ok = await exchange(url, get(b"/after"))
        assert ep.broker is not None
        gpu_leases = ep.broker.counters["svc"]["gpu"]
    assert refused.status == 400
    assert refused_by_parser(broker_server, refused) or refused.json()["error"] == "bad_request"
    assert ok.status == 200
    assert rec.targets() == [b"/after"]  # neither the GET nor the hidden POST got through
    assert gpu_leases == 0


@pytest.mark.parametrize(
    ("request_bytes", "body"),
    [
        (b"GET /r HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (b"POST /r HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 005\r\n\r\nhello", b"hello"),
        (b"POST /r HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5, 5\r\n\r\nhello", b"hello"),
        (
            b"POST /r HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            b"hello",
        ),
        (
            b"POST /r HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\nTrailer: t\r\n\r\n",
            b"hello",
        ),
        (b"POST /r HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", b""),
        (
            b"POST /r HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: content-length\r\n"
            b"Content-Length: 5\r\n\r\nhello",
            b"hello",
        ),
    ],
    ids=["get-with-length", "leading-zeros", "list", "twice", "chunked", "empty", "hop-by-hop"],
)
async def test_the_upstream_gets_exactly_one_framing_that_matches_the_body(
    request_bytes: bytes, body: bytes, broker_server: str
) -> None:
    async with broker_for(classifier="process") as (rec, ep):  # GPU work, the leased path too
        response = await exchange(ep.proxies["svc"], request_bytes)
        repeated = b"5, 5" in request_bytes or request_bytes.count(b"Content-Length: 5") == 2
        if repeated and refused_by_parser(broker_server, response):
            assert rec.seen == []  # httptools takes a repeated Content-Length as malformed
            return
        assert response.status == 200
    [seen] = rec.seen
    assert seen.body == body
    lengths, codings = seen.header(b"content-length"), seen.header(b"transfer-encoding")
    assert len(lengths) + len(codings) <= 1  # one framing, at most
    assert lengths in ([b"%d" % len(body)], []) and codings in ([b"chunked"], [])


@pytest.mark.parametrize(
    "coding", [b"gzip, chunked", b"identity", b"chunked\r\nTransfer-Encoding: chunked"]
)
async def test_a_transfer_coding_other_than_chunked_is_never_forwarded(coding: bytes) -> None:
    head = b"POST /r HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: "
    request = head + coding + b"\r\n\r\n0\r\n\r\n"
    async with broker_for() as (rec, ep):
        response = await exchange(ep.proxies["svc"], request)
    assert response.status in (400, 501)
    assert rec.seen == []


# --- 2. HTTP/2 request bodies ----------------------------------------------------------------


class H2Client:
    """Just enough of an HTTP/2 client (h2, over a raw socket) to send odd requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def send(
        self, stream_id: int, method: bytes, path: bytes, headers: Headers, chunks: list[bytes]
    ) -> None:
        pseudo = [(b":method", method), (b":scheme", b"http"), (b":authority", b"x")]
        self.conn.send_headers(
            stream_id, [*pseudo, (b":path", path), *headers], end_stream=not chunks
        )
        for i, chunk in enumerate(chunks):
            self.conn.send_data(stream_id, chunk, end_stream=i == len(chunks) - 1)
        await self.flush()

    async def answer(self, stream_id: int) -> tuple[int | None, bytes]:
        """(status, body) of a stream; status None when the server reset it."""
        status: int | None = None
        body = b""
        while True:
            data = await self.reader.read(65536)
            if not data:
                return status, body
            for event in self.conn.receive_data(data):
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    self.conn.acknowledge_received_data(len(event.data), stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, body
                elif isinstance(event, h2.events.StreamReset):
                    return None, body
            await self.flush()


@pytest.mark.parametrize("classifier", ["generic", "process"])  # passthrough, then leased
async def test_http2_prior_knowledge_body_without_length_reaches_the_upstream(
    classifier: str, broker_server: str
) -> None:
    no_http2(broker_server)
    async with broker_for(classifier=classifier) as (rec, ep):
        with anyio.fail_after(10):
            async with connection(ep.proxies["svc"]) as (reader, writer):
                client = H2Client(reader, writer)
                client.conn.initiate_connection()
                await client.send(1, b"POST", b"/generate", [], [b"part one, ", b"part two"])
                status, answer = await client.answer(1)
                crumbs = [(b"cookie", b"a=1"), (b"cookie", b"b=2")]  # h2 may split Cookie
                await client.send(3, b"GET", b"/tags", crumbs, [])  # and a body-less one after it
                status2, _ = await client.answer(3)
    assert (status, status2) == (200, 200)
    assert json.loads(answer)["got"] == len(b"part one, part two")
    assert [(s.method, s.target, s.body) for s in rec.seen] == [
        ("POST", b"/generate", b"part one, part two"),
        ("GET", b"/tags", b""),
    ]
    assert rec.seen[0].header(b"transfer-encoding") == [b"chunked"]
    assert rec.seen[1].header(b"transfer-encoding") == rec.seen[1].header(b"content-length") == []
    assert rec.seen[1].header(b"cookie") == [b"a=1; b=2"]  # one Cookie for HTTP/1.1


async def test_http2_with_httpx_streams_a_body_without_length(broker_server: str) -> None:
    no_http2(broker_server)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": '
        yield b'"hi"}'

    async with broker_for() as (rec, ep), httpx.AsyncClient(http1=False, http2=True) as client:
        with anyio.fail_after(10):
            response = await client.post(ep.proxies["svc"] + "/generate", content=chunks())
    assert response.http_version == "HTTP/2"
    assert response.status_code == 200
    assert [s.body for s in rec.seen] == [b'{"prompt": "hi"}']


async def test_http2_length_that_disagrees_with_the_body_is_not_forwarded_as_such(
    broker_server: str,
) -> None:
    no_http2(broker_server)
    async with broker_for() as (rec, ep):
        with anyio.fail_after(10):
            async with connection(ep.proxies["svc"]) as (reader, writer):
                client = H2Client(reader, writer)
                client.conn.initiate_connection()
                client.conn.config.validate_outbound_headers = False
                await client.send(1, b"POST", b"/r", [(b"content-length", b"3")], [b"hello"])
                status, _ = await client.answer(1)
    assert status != 200
    assert all(s.body == b"hello"[: len(s.body)] and len(s.body) <= 3 for s in rec.seen)
    assert all(s.header(b"content-length") in ([b"3"], []) for s in rec.seen)


async def test_h2c_upgrade_then_a_body_on_the_upgraded_connection(broker_server: str) -> None:
    no_http2(broker_server)
    async with broker_for() as (rec, ep):
        with anyio.fail_after(10):
            async with connection(ep.proxies["svc"]) as (reader, writer):
                client = H2Client(reader, writer)
                settings_header = client.conn.initiate_upgrade_connection()
                writer.write(
                    get(
                        b"/first",
                        b"Connection: Upgrade, HTTP2-Settings",
                        b"Upgrade: h2c",
                        b"HTTP2-Settings: " + settings_header,
                    )
                )
                switching = await reader.readuntil(b"\r\n\r\n")
                await client.flush()
                first, _ = await client.answer(1)
                await client.send(3, b"POST", b"/generate", [], [b"upgraded ", b"body"])
                status, _ = await client.answer(3)
    assert switching.startswith(b"HTTP/1.1 101 ")
    assert (first, status) == (200, 200)
    assert [(s.target, s.body) for s in rec.seen] == [
        (b"/first", b""),
        (b"/generate", b"upgraded body"),
    ]


async def test_h2c_upgrade_with_a_body_is_answered_in_http11_with_the_body_forwarded(
    broker_server: str,
) -> None:
    no_http2(broker_server)
    settings_header = base64.urlsafe_b64encode(b"").rstrip(b"=")
    request = post(
        b"/generate",
        b"a body",
        b"Connection: Upgrade, HTTP2-Settings",
        b"Upgrade: h2c",
        b"HTTP2-Settings: " + settings_header,
    )
    async with broker_for() as (rec, ep):
        response = await exchange(ep.proxies["svc"], request)
    assert response.status_line.startswith(b"HTTP/1.1 200")
    [seen] = rec.seen
    assert seen.body == b"a body"
    names = {k for k, _ in seen.headers}
    assert not names & {b"upgrade", b"http2-settings", b"connection"}


# --- 3. the classifier sees what the upstream's router will see --------------------------------

GPU_SPELLINGS = [
    (b"http://x/api/generate", b"/api/generate"),
    (b"HTTPS://user@x:99/api/generate", b"/api/generate"),
    (b"//api/generate", b"/api/generate"),
    (b"/api//generate", b"/api/generate"),
    (b"/api/generate/", b"/api/generate/"),
    (b"/x/../api/generate", b"/api/generate"),
    (b"/api/./generate", b"/api/generate"),
    (b"/../api/generate", b"/api/generate"),
    (b"/api/generate;x", b"/api/generate;x"),
    (b"/api;v=1/generate", b"/api;v=1/generate"),
    (b"/api/%67enerate", b"/api/generate"),
    (b"/%61%70%69/%67%65nerate", b"/api/generate"),
    (b"/api/x/%2e%2E/generate", b"/api/generate"),
    (b"/api/generate?stream=false", b"/api/generate?stream=false"),
    (b"http://x/api/generate?q=1", b"/api/generate?q=1"),
]


@pytest.mark.parametrize(("spelling", "forwarded"), GPU_SPELLINGS)
async def test_every_spelling_of_a_gpu_path_takes_a_lease(
    spelling: bytes, forwarded: bytes
) -> None:
    async with broker_for(classifier="ollama") as (rec, ep):
        response = await exchange(ep.proxies["svc"], post(spelling))
        assert ep.broker is not None
        leases = ep.broker.counters["svc"]["gpu"]
    assert response.status == 200
    assert leases == 1
    assert response.header(b"x-gpubroker-queue-ms") is not None
    assert rec.targets() == [forwarded]  # forwarded as it was classified


@pytest.mark.parametrize(
    "spelling",
    [
        b"/api%2Fgenerate",
        b"/api%2fgenerate",
        b"/api/generate%00",
        b"/api/%5cgenerate",
        b"/api\\generate",
        b"/api/gen%zzerate",
        b"/api/generate#x",
        b"api/generate",
        b"ftp://x/api/generate",
        b"*",
    ],
)
async def test_a_target_that_cannot_be_normalised_is_refused(
    spelling: bytes, broker_server: str
) -> None:
    async with broker_for(classifier="ollama") as (rec, ep):
        response = await exchange(ep.proxies["svc"], post(spelling))
    if broker_server == "uvicorn" and response.status == 200:
        # uvicorn hands over the path its URL parser made of the target (no fragment, no
        # scheme and host): forwarded as exactly what was classified, under a lease.
        assert rec.targets() == [b"/api/generate"]
        assert ep.broker is not None and ep.broker.counters["svc"]["gpu"] == 1
        return
    assert response.status == 400
    assert rec.seen == []
    if response.body and not refused_by_parser(broker_server, response):  # Hypercorn itself
        # refuses some of them, with an empty 400
        assert response.json()["error"] == "bad_request"


async def test_plain_reads_and_options_star_pass_through_untouched() -> None:
    async with broker_for(classifier="ollama") as (rec, ep):
        url = ep.proxies["svc"]
        tags = await exchange(url, get(b"/api/tags?x=%2F%20y"))
        star = await exchange(url, b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert ep.broker is not None
        leases = ep.broker.counters["svc"]["gpu"]
    assert (tags.status, star.status, leases) == (200, 200, 0)
    assert rec.targets() == [b"/api/tags?x=%2F%20y", b"*"]


def test_normalise_and_route_variants() -> None:
    assert normalise(b"/api/generate") == b"/api/generate"
    assert normalise(b"http://h:1") == b"/"
    assert normalise(b"/a/%7e%41%c3%a9%25") == b"/a/~A%C3%A9%25"
    assert normalise(b"/a/b/..") == b"/a/"
    assert normalise(b"/a/./") == b"/a/"
    assert normalise(b"/..") == b"/"
    assert route_variants(b"/api/generate") == ("/api/generate",)
    assert route_variants(b"/a/%C3%A9/") == ("/a/é/", "/a/é")
    assert route_variants(b"/x/..;/api/generate") == ("/x/..;/api/generate", "/api/generate")
    for bad in (b"", b"x", b"/a%2F", b"/a%0a", b"/a%7F", b"/a%", b"/\xff", b"/a b", b"gopher://h/"):
        with pytest.raises(BadTarget):
            normalise(bad)


def router_view(target: bytes) -> str:
    """The path a lenient router matches for ``target`` (written apart from target.py).

    Absolute form stripped (RFC 9112 §3.2.2), query and fragment cut, percent-decoded,
    ``;params`` dropped per segment, slashes collapsed, dot-segments resolved, and a trailing
    slash ignored: the union of what Go's ServeMux, gin, aiohttp and Tomcat-style servers do.
    """
    text = target.decode("latin-1")
    text = re.sub(r"(?i)^https?://[^/?#]*", "", text) or "/"
    text = unquote(re.split(r"[?#]", text, maxsplit=1)[0])
    text = "/".join(segment.split(";", 1)[0] for segment in text.split("/"))
    text = posixpath.normpath(re.sub("/+", "/", "/" + text))
    return re.sub("/+", "/", text).rstrip("/") or "/"


GPU_ROUTES = OllamaClassifier.routes


def _encode(text: str, which: list[bool], upper: bool) -> str:
    return (
        "".join(
            (f"%{ord(c):02X}" if upper else f"%{ord(c):02x}") if enc and c != "/" else c
            for c, enc in zip(text, which, strict=False)
        )
        + text[len(which) :]
    )


@st.composite
def spellings(draw: st.DrawFn) -> bytes:
    """A spelling of a GPU route or a near miss, in the forms routers are lenient about."""
    path = draw(st.sampled_from([*GPU_ROUTES, "/api/tags", "/api/show", "/v1/models", "/"]))
    segments = path.strip("/").split("/")
    out: list[str] = []
    for segment in segments:
        for _ in range(draw(st.integers(0, 2))):
            out.append(draw(st.sampled_from([".", "", "x/..", "..", "%2e", "a;b/..", "x%2f.."])))
        encoded = _encode(segment, draw(st.lists(st.booleans(), max_size=12)), draw(st.booleans()))
        if draw(st.integers(0, 5)) == 0:
            encoded += ";" + draw(st.sampled_from(["x", "v=1", ""]))
        out.append(encoded)
    text = "/" + "/".join(out) + draw(st.sampled_from(["", "", "/", "//", "/."]))
    if draw(st.booleans()):
        text = draw(st.sampled_from(["http://x", "HTTP://h:1", "https://a@b"])) + text
    text += draw(st.sampled_from(["", "?stream=true", "?a=/api/generate"]))
    return text.encode()


def test_property_whatever_reaches_the_upstream_as_a_gpu_path_took_a_lease() -> None:
    """Over generated spellings, through one real broker: no GPU route without a lease."""
    rec = Recorder()

    async def start(ready: anyio.Event, stop: anyio.Event, out: list[Endpoints]) -> None:
        async with running(rec) as up:
            spec = {"upstream": up, "unloadStrategy": "generic", "classifier": "ollama"}
            spec["healthPath"] = HEALTH.decode()
            async with broker_running(make_config({"svc": spec})) as ep:
                out.append(ep)
                ready.set()
                await stop.wait()

    with anyio.from_thread.start_blocking_portal() as portal:
        ready, stop = portal.call(anyio.Event), portal.call(anyio.Event)
        out: list[Endpoints] = []
        future = portal.start_task_soon(start, ready, stop, out)
        portal.call(ready.wait)
        url = out[0].proxies["svc"]
        probe = iter(range(10**9))
        aimed: list[bool] = []  # per generated GPU-route spelling: whether it was leased

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(spellings())
        def check(spelling: bytes) -> None:
            n = next(probe)
            response = portal.call(exchange, url, post(spelling, b"{}", b"X-Probe: %d" % n))
            reached = [s for s in rec.seen if s.header(b"x-probe") == [b"%d" % n]]
            leased = response.header(b"x-gpubroker-queue-ms") is not None
            for seen in reached:
                if router_view(seen.target) in GPU_ROUTES:
                    assert leased, (spelling, seen.target)
            if router_view(spelling) in GPU_ROUTES:  # the generator aims at GPU routes: they
                assert leased or response.status == 400, spelling  # are leased or refused
                aimed.append(leased)

        try:
            check()
            assert sum(aimed) >= 20  # the property was exercised on many GPU spellings
        finally:
            portal.call(stop.set)
            future.result(timeout=30)


# --- 4. methods a reverse proxy does not forward ----------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        b"CONNECT /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"TRACE / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"trace /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ],
)
async def test_connect_and_trace_are_405_with_allow(
    request_bytes: bytes, broker_server: str
) -> None:
    async with broker_for() as (rec, ep):
        responses = [await exchange(ep.proxies["svc"], request_bytes) for _ in range(3)]
    for response in responses:
        if refused_by_parser(broker_server, response):
            continue  # httptools refuses CONNECT and a lowercase method itself
        assert response.status == 405
        assert response.json()["error"] == "method_not_allowed"
        allow = response.header(b"allow")
        assert allow is not None and b"OPTIONS" in allow and b"CONNECT" not in allow
    assert rec.seen == []


async def test_http2_connect_is_405_and_the_connection_lives_on(broker_server: str) -> None:
    """A plain h2 CONNECT has no :path; Hypercorn alone dies on it with a traceback."""
    no_http2(broker_server)
    async with broker_for() as (rec, ep):
        with anyio.fail_after(10):
            async with connection(ep.proxies["svc"]) as (reader, writer):
                client = H2Client(reader, writer)
                client.conn.initiate_connection()
                tunnel = [(b":method", b"CONNECT"), (b":authority", b"example.com:443")]
                client.conn.send_headers(1, tunnel)
                await client.flush()
                refused, _ = await client.answer(1)
                await client.send(3, b"TRACE", b"/", [], [])
                traced, _ = await client.answer(3)
                await client.send(5, b"GET", b"/after", [], [])
                after, _ = await client.answer(5)
    assert (refused, traced, after) == (405, 405, 200)
    assert rec.targets() == [b"/after"]


async def test_options_and_unusual_methods_pass_through() -> None:
    async with broker_for(classifier="ollama") as (rec, ep):
        url = ep.proxies["svc"]
        options = await exchange(url, b"OPTIONS /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        propfind = await exchange(url, b"PROPFIND /dav HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert (options.status, propfind.status) == (200, 200)
    assert [(s.method, s.target) for s in rec.seen] == [
        ("OPTIONS", b"/api/generate"),
        ("PROPFIND", b"/dav"),
    ]


# --- 5. a loop through the broker is bounded ---------------------------------------------------


async def test_via_is_appended_and_a_request_past_too_many_brokers_is_508() -> None:
    async with broker_for() as (rec, ep):
        url = ep.proxies["svc"]
        once = await exchange(url, get(b"/a", b"Via: 1.0 corp-proxy"))
        looped = await exchange(
            url, get(b"/b", b"Via: " + b", ".join([b"1.1 gpubroker"] * MAX_HOPS))
        )
    assert once.status == 200
    assert rec.seen[0].header(b"via") == [b"1.0 corp-proxy, 1.1 gpubroker"]
    assert looped.status == 508
    assert looped.json()["error"] == "loop_detected"
    assert rec.targets() == [b"/a"]


def websocket_upgrade(*extra: bytes) -> bytes:
    return get(
        b"/ws",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
        *extra,
    )


async def test_websocket_handshakes_past_the_bounds_are_refused_before_any_upstream(
    broker_server: str,
) -> None:
    async with broker_for() as (rec, ep):
        url = ep.proxies["svc"]
        looped = await exchange(url, websocket_upgrade(b"Via: " + b", ".join([VIA] * MAX_HOPS)))
        big = await exchange(url, websocket_upgrade(b"X-Big: " + b"a" * 100_000))
        many = await exchange(url, websocket_upgrade(*[b"X-%d: 1" % i for i in range(20_000)]))
    assert looped.status == 508
    assert big.status == many.status == 431
    if broker_server == "hypercorn":  # uvicorn's protocol answers it in plain text, as for HTTP
        assert big.json()["error"] == "headers_too_large"
    assert rec.seen == []


@asynccontextmanager
async def relay() -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP relay on a free port to the port put in the list later (the loop's last link).

    Connections made before the port is known are closed at once.
    """
    target: list[int] = []
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)

    async def pump(a: anyio.abc.ByteStream, b: anyio.abc.ByteStream) -> None:
        try:
            async for data in a:
                await b.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await b.aclose()

    async def handle(client: anyio.abc.SocketStream) -> None:
        if not target:
            await client.aclose()
            return
        upstream = await anyio.connect_tcp("127.0.0.1", target[0])
        async with client, upstream, anyio.create_task_group() as tg:
            tg.start_soon(pump, client, upstream)
            tg.start_soon(pump, upstream, client)

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        try:
            yield f"http://127.0.0.1:{port}", target
        finally:
            tg.cancel_scope.cancel()


async def test_two_brokers_pointing_at_each_other_answer_508_and_stop() -> None:
    """A -> B -> (relay) -> A -> ...: bounded by Via, answered, and both brokers stop."""
    with anyio.fail_after(30):
        async with relay() as (relay_url, relay_to):
            spec = {"unloadStrategy": "generic", "classifier": "generic"}
            cfg_b = make_config({"b": {**spec, "upstream": relay_url}})
            async with broker_running(cfg_b) as b:
                cfg_a = make_config({"a": {**spec, "upstream": b.proxies["b"]}})
                async with broker_running(cfg_a) as a:
                    relay_to.append(host_port(a.proxies["a"])[1])
                    gets = [await exchange(a.proxies["a"], get(b"/x")) for _ in range(3)]
                    posted = await exchange(a.proxies["a"], post(b"/generate"))
    for response in [*gets, posted]:
        assert response.status == 508
        assert response.json()["error"] == "loop_detected"


# --- 6. the request head bound ----------------------------------------------------------------


@pytest.mark.parametrize("port", ["proxy", "status"])
async def test_a_request_head_over_64_kib_is_431_even_in_one_read(
    port: str, broker_server: str
) -> None:
    async with broker_for() as (rec, ep):
        url = ep.proxies["svc"] if port == "proxy" else ep.status_url
        fine = await exchange(url, get(b"/health", b"X-Big: " + b"a" * (MAX_HEAD // 2)))
        big = await exchange(url, get(b"/health", b"X-Big: " + b"a" * 100_000))
        many = [b"X-H%d: %s" % (i, b"b" * 1000) for i in range(70)]
        split = await exchange(url, get(b"/health", *many))
        long_target = await exchange(url, get(b"/health?q=" + b"c" * (MAX_HEAD + 10)))
    assert fine.status == 200
    for response in (big, split, long_target):
        if refused_by_parser(broker_server, response):
            continue  # past llhttp's own header bound
        assert response.status == 431
        assert response.json()["error"] == "headers_too_large"
    assert len(rec.seen) == (1 if port == "proxy" else 0)


# --- 7. reason phrases -------------------------------------------------------------------------


async def test_status_lines_carry_the_standard_reason_phrase() -> None:
    async with broker_for() as (_, ep):
        proxied = await exchange(ep.proxies["svc"], get(b"/x"))
        status = await exchange(ep.status_url, get(b"/"))
        missing = await exchange(ep.status_url, get(b"/no-such-page"))
        refused = await exchange(ep.proxies["svc"], b"TRACE / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert proxied.status_line == b"HTTP/1.1 200 OK"
    assert status.status_line == b"HTTP/1.1 200 OK"
    assert missing.status_line == b"HTTP/1.1 404 Not Found"
    assert refused.status_line == b"HTTP/1.1 405 Method Not Allowed"


async def test_a_broker_made_502_reads_bad_gateway() -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    cfg = make_config({"svc": {"upstream": f"http://127.0.0.1:{port}"}})
    async with broker_running(cfg) as ep:
        response = await exchange(ep.proxies["svc"], get(b"/x"))
    assert response.status_line == b"HTTP/1.1 502 Bad Gateway"
