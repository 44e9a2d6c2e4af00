"""``server: uvicorn``: the same ASGI apps on the same pre-bound sockets, served by uvicorn with
httptools (and uvloop, when ``gpubroker serve`` runs on it): the optional ``fast`` extra.

Why: on small requests the server layer, not the proxy, is most of the cost (on the 2-core
development machine a hello-world ASGI app answers ~7k req/s under Hypercorn, ~30k under
uvicorn with httptools and uvloop), so this is how the proxy gets well ahead of a Node peer.
Hypercorn stays the default; uvicorn speaks no HTTP/2 (``h2c`` clients fall back to HTTP/1.1).

What ``listener.serve`` promises holds here too, with uvicorn's own parts where it has them:

- the port: ``Listener``'s socket, handed to uvicorn's ``Server.startup(sockets=...)``;
- shutdown: ``shutdown_trigger`` sets ``should_exit``; uvicorn stops accepting, closes idle
  connections, lets in-flight responses finish for ``graceful_timeout`` s, then cancels them
  (``Server.shutdown``). Its signal handlers are left out: ``gpubroker serve`` owns SIGINT and
  SIGTERM;
- bounds: the head limit (431) and the body's idle bound (408) are the same ASGI wrappers as
  under Hypercorn; ``header_timeout`` (uvicorn has none) is added to its httptools protocol
  (:class:`_Protocol`): a head must complete within it of its first byte, and a connection
  that sends nothing gets the keep-alive timeout from the start, as under Hypercorn; idle
  keep-alive connections close after ``KEEP_ALIVE_TIMEOUT``;
- headers: no Server or Date of its own on the proxy ports (``own_headers=False``), and no
  ``X-Forwarded-For`` rewriting of the client address (uvicorn's ``proxy_headers`` is off: the
  proxy appends to that header itself and must see the real peer);
- WebSockets: uvicorn's sans-I/O websockets protocol, with the denial response
  (``websocket.http.response.*``) the proxy sends for a refused upgrade, no pings of its own,
  the same head bound as HTTP (:func:`_ws_protocol_class`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

MISSING = (
    "uvicorn with httptools is not installed (the `fast` extra): pip install 'gpubroker[fast]'"
)
_TEXT = b"the request head is too large"
TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_TEXT), _TEXT)
)


def available() -> str | None:
    """None when ``server: uvicorn`` can run here, else what to install."""
    if all(importlib.util.find_spec(m) for m in ("uvicorn", "httptools")):
        return None
    return MISSING


def _protocol_class(header_timeout: float | None, max_head: int) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _Protocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with a deadline on the request head and a bound on its
        size while it arrives (``_HeadLimit`` answers a complete one that is too large)."""

        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = -1  # -1: not inside a head
        _head_size = 0  # the last complete head's
        _in_message = False  # between a request's first byte and its body's end

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            # Nothing sent yet: the keep-alive bound applies, as between requests.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if header_timeout is not None and self._head_timer is None and not self._in_message:
                # Bytes between requests: a head begins, or blank lines before one, which the
                # parser skips without beginning a message (RFC 9112 §2.2) while uvicorn stops
                # its keep-alive timer for any data: the head deadline runs either way.
                self._head_timer = self.loop.call_later(header_timeout, self._head_expired)
            super().data_received(data)
            if self._head_bytes > max_head and not self.transport.is_closing():
                self._stop_head_timer()
                self.transport.write(TOO_LARGE)
                self.transport.close()
            cycle = self.cycle
            if (
                self.timeout_keep_alive_task is None
                and self._head_timer is None
                and cycle is not None
                and cycle.response_complete
                and not self.pipeline
                and self.transport.get_protocol() is self  # (not handed to a WebSocket)
                and not self.transport.is_closing()
            ):
                # The rest of a body whose answer went out already, read and dropped: uvicorn
                # stops its keep-alive timer for any bytes and starts it only at a response's
                # end, so a client stalling here had no bound at all. It is idle: keep-alive.
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

        def on_message_begin(self) -> None:
            self._in_message = True
            super().on_message_begin()
            self._head_bytes = 0
            if header_timeout is not None and self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout, self._head_expired)

        def on_url(self, url: bytes) -> None:
            self._head_bytes += len(url)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_bytes += len(name) + len(value) + 4
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._stop_head_timer()
            self._head_size, self._head_bytes = self._head_bytes, -1
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and cycle.transport is self.transport:  # (not an upgrade)
                cycle.transport = _Cork(self.transport, self.loop)  # type: ignore[assignment]
                if cycle.scope["http_version"] == "1.0":  # (run_asgi reads .send later)
                    cycle.send = _CloseDelimited(cycle)  # type: ignore[method-assign]

        def handle_websocket_upgrade(self) -> None:
            if self._head_size > max_head:  # arrived whole in one read: refused as above
                self.transport.write(TOO_LARGE)
                self.transport.close()
                return
            super().handle_websocket_upgrade()

        def on_message_complete(self) -> None:
            self._in_message = False
            super().on_message_complete()

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return _Protocol


def _ws_protocol_class(max_head: int) -> type[asyncio.Protocol]:
    """uvicorn's sans-I/O websockets protocol, taking every head the HTTP protocol let through
    and answering the handshakes it still refuses.

    uvicorn hands the upgrade's head, re-serialised, to the ``websockets`` parser, whose own
    bounds (a line of 8 KiB, 128 headers) are below ours: a browser's Cookie over 8 KiB was
    refused there, and the refusal (a 431 the parser queues) was never written, so the client
    waited with no answer until it gave up. Its bounds are raised to ours (module globals it
    reads at each parse: the only way to set them, which also applies to the proxy's upstream
    WebSocket client, harmlessly), and any handshake it refuses gets its answer and a close.
    """
    import websockets.http11
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    websockets.http11.MAX_LINE_LENGTH = max(websockets.http11.MAX_LINE_LENGTH, max_head)
    websockets.http11.MAX_NUM_HEADERS = max(websockets.http11.MAX_NUM_HEADERS, max_head // 4)

    class _WebSocketProtocol(WebSocketsSansIOProtocol):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            refused = self.conn.handshake_exc is not None and not self.handshake_initiated
            if refused and not self.transport.is_closing():
                self.transport.write(b"".join(self.conn.data_to_send()))
                self.transport.close()

    return _WebSocketProtocol


class _CloseDelimited:
    """The ``send`` of an HTTP/1.0 request's cycle: a body of unknown length goes out as is,
    ended by closing the connection, as h11 does. uvicorn chunks it whatever the request's
    version, and a 1.0 client, which knows no chunked coding (RFC 9112 §6.1: it must not get
    it), read the chunk sizes as part of the body.

    It presets the cycle's framing before the head (not chunked, no keep-alive: uvicorn then
    adds ``connection: close``) and lets each body write pass uvicorn's length check."""

    __slots__ = ("cycle", "delimited", "send")

    def __init__(self, cycle: Any) -> None:
        self.cycle = cycle
        self.send = cycle.send
        self.delimited = False

    async def __call__(self, message: Any) -> None:
        cycle = self.cycle
        kind = message["type"]
        if kind == "http.response.start" and not cycle.response_started:
            framed = any(
                k.lower() in (b"content-length", b"transfer-encoding")
                for k, _ in message.get("headers", ())
            )
            status = message["status"]
            if not framed and cycle.scope["method"] != "HEAD" and status not in (204, 304):
                self.delimited = True
                cycle.chunked_encoding = False
                cycle.keep_alive = False
        elif kind == "http.response.body" and self.delimited and not cycle.response_complete:
            cycle.expected_content_length = len(message.get("body", b""))
        await self.send(message)


class _Cork:
    """A response's head held back until its body's first write, the two sent as one: uvicorn
    writes a head as soon as it is given and the body apart, two ``send`` syscalls for a small
    answer that arrived whole (the proxy sends both in one step). A head followed by nothing
    yet (a stream that starts later) goes out when the loop step ends (``call_soon``); every
    later write goes straight through."""

    __slots__ = ("_head", "_loop", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._head: bytes | None = None  # b"": the cork is spent

    def write(self, data: bytes) -> None:
        head = self._head
        if head is None:  # the first write: hold it for the rest of this step
            self._head = data
            self._loop.call_soon(self.flush)
            return
        if head:
            data = head + data
            self._head = b""
        if not self.transport.is_closing():
            self.transport.write(data)

    def flush(self) -> None:
        head = self._head
        if head:
            self._head = b""
            if not self.transport.is_closing():
                self.transport.write(head)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        self.flush()
        self.transport.close()


async def serve_uvicorn(
    app: Any,
    sock: Any,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    *,
    graceful_timeout: float,
    own_headers: bool,
    header_timeout: float | None,
    keep_alive_timeout: float,
    max_head: int,
) -> None:
    """Serve the (already wrapped) ASGI ``app`` on the listening ``sock`` until the trigger."""
    import uvicorn

    quiet = logging.getLogger("uvicorn.error")
    if quiet.level == logging.NOTSET:  # its start/stop lines at INFO would repeat ours per port
        quiet.setLevel(logging.WARNING)
    if not any(isinstance(f, _OnPurpose) for f in quiet.filters):
        quiet.addFilter(_OnPurpose())
    config = uvicorn.Config(
        app,
        http=_protocol_class(header_timeout, max_head),
        ws=_ws_protocol_class(max_head),
        ws_ping_interval=None,
        lifespan="auto",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=own_headers,
        date_header=own_headers,
        timeout_keep_alive=int(keep_alive_timeout),
        timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]  # (a float works)
        backlog=1024,
    )
    server = _server_class()(config)

    async def stop_on_trigger() -> None:
        await shutdown_trigger()
        server.should_exit = True

    watcher = asyncio.create_task(stop_on_trigger())
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
        sock.close()


class _OnPurpose(logging.Filter):
    """Drops uvicorn's error line for a response left unfinished: the proxy does that on purpose
    (an upstream that broke off a body: the client must see the truncation, app.py), and
    logs why itself. A request cancelled when ``shutdownGrace`` ran out is no error either:
    its traceback is dropped, and the line counting them is a warning, as a routine restart
    with streams open is (Hypercorn says nothing)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message == "ASGI callable returned without completing response.":
            return False
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            return not message.startswith("Exception in ASGI application")
        if message.endswith("timeout graceful shutdown exceeded"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _server_class() -> type:
    """uvicorn's Server without its signal handlers (made on first use: uvicorn is optional)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the CLI owns SIGINT/SIGTERM and sets the shutdown trigger

    return Server
