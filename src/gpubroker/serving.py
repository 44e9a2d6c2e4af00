"""Serve ASGI apps on sockets we bind ourselves, so callers learn the real port before serving.

Binding first (instead of letting Hypercorn bind) gives two things: a port-0 bind tells the
caller which port it got, with no race between "find a free port" and "listen on it", and a
bind error (port in use, permission) surfaces as an ``OSError`` before anything is started.
"""

from __future__ import annotations

import http
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h11
import hypercorn.protocol
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol

from .responses import error_body
from .target import MAX_HEAD, head_size

ASGIApp = Callable[..., Awaitable[None]]

_PHRASES = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_RESPONSES = (h11.Response, h11.InformationalResponse)


class _H11WithReasons(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol, sending the standard reason phrase (``200 OK``).

    Hypercorn builds its ``h11.Response`` events without a reason, so every status line reads
    ``HTTP/1.1 200 `` and ASGI has no field to give one; clients that show or log the phrase
    (curl -v, proxies, old HTTP/1.0 parsers) see an empty one. Hypercorn has no setting for it,
    so the phrase is filled in here, on the event just before h11 writes it; h11's events are
    frozen dataclasses that h11 itself fills with ``object.__setattr__``, as done here.
    """

    async def _send_h11_event(self, event: Any) -> None:
        if isinstance(event, _RESPONSES) and not event.reason:
            object.__setattr__(event, "reason", _PHRASES.get(event.status_code, b""))
        await super()._send_h11_event(event)


class _H2WithoutPlainConnect(H2Protocol):
    """Hypercorn's HTTP/2 protocol, answering a plain ``CONNECT`` with 405.

    A plain HTTP/2 CONNECT (a tunnel, RFC 9113 §8.5) has no ``:path``; Hypercorn 0.18 fails
    on it with an UnboundLocalError that kills the connection and logs a traceback per request.
    The broker tunnels nothing (the proxy answers an HTTP/1.1 CONNECT with 405 too), so the
    stream gets a 405 and is then reset with NO_ERROR so the client stops sending (§8.1).
    """

    async def _create_stream(self, request: h2.events.RequestReceived) -> None:
        if any(name == b":path" for name, _ in request.headers or ()):
            await super()._create_stream(request)
            return
        allow = (b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
        self.connection.send_headers(
            request.stream_id, [(b":status", b"405"), allow], end_stream=True
        )
        try:
            self.connection.reset_stream(request.stream_id, h2.errors.ErrorCodes.NO_ERROR)
        except h2.exceptions.StreamClosedError:
            pass  # the client had finished its side: the stream is already closed


# Hypercorn's ProtocolWrapper looks both classes up in this module on each new connection.
hypercorn.protocol.H11Protocol = _H11WithReasons  # type: ignore[misc]
hypercorn.protocol.H2Protocol = _H2WithoutPlainConnect  # type: ignore[misc]


class _HeadLimit:
    """Answers 431 to a request head over ``MAX_HEAD`` bytes (target and headers).

    Hypercorn's ``h11_max_incomplete_size`` bounds only a head still arriving: one that comes
    in a single read (up to twice the bound) is parsed whole and reaches the app, and HTTP/2
    has no such bound at all. The app sees the parsed head, so it is counted here.
    """

    __slots__ = ("app",)

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" or head_size(scope) <= MAX_HEAD:
            await self.app(scope, receive, send)
            return
        body = error_body(
            "headers_too_large",
            f"the request head is over {MAX_HEAD // 1024} KiB",
            None,
            False,
        )
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        prefix = "websocket.http" if scope["type"] == "websocket" else "http"
        await send({"type": f"{prefix}.response.start", "status": 431, "headers": headers})
        await send({"type": f"{prefix}.response.body", "body": body})


@dataclass(slots=True)
class Listener:
    """A bound, listening TCP socket waiting to be handed to Hypercorn."""

    sock: socket.socket
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def listen(host: str = "127.0.0.1", port: int = 0, backlog: int = 1024) -> Listener:
    """Bind and listen now; raises ``OSError`` when the address cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return Listener(sock=sock, host=host, port=int(sock.getsockname()[1]))


async def serve(
    app: Any,
    listener: Listener,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    *,
    graceful_timeout: float = 30.0,
    own_headers: bool = True,
) -> None:
    """Serve ``app`` on ``listener`` until ``shutdown_trigger`` returns, then drain in-flight work.

    Hypercorn takes ownership of the socket. In-flight requests get ``graceful_timeout`` seconds
    to finish after the trigger fires. ``own_headers=False`` leaves out Hypercorn's Date and
    Server headers (for the proxy ports, which pass the upstream's own).
    """
    config = HypercornConfig()
    config.bind = [f"fd://{listener.sock.detach()}"]
    config.graceful_timeout = graceful_timeout
    config.backlog = 1024  # Hypercorn listens again with its own backlog (100 by default)
    # A proxy passes the upstream's Date and Server through; adding ours would duplicate them.
    config.include_date_header = own_headers
    config.include_server_header = own_headers
    config.accesslog = None
    config.errorlog = logging.getLogger("gpubroker.http")
    config.keep_alive_timeout = 75
    config.h11_max_incomplete_size = MAX_HEAD
    config.websocket_ping_interval = None
    await hypercorn_serve(_HeadLimit(app), config, shutdown_trigger=shutdown_trigger)
