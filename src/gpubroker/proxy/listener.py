"""Serve ASGI apps on sockets we bind ourselves, so callers learn the real port before serving.

Binding first (instead of letting Hypercorn bind) gives two things: a port-0 bind tells the
caller which port it got, with no race between "find a free port" and "listen on it", and a
bind error (port in use, permission) surfaces as an ``OSError`` before anything is started.

Every port is bounded against slow or stalled clients (slowloris), with the bounds Hypercorn
lacks added here: a request head must arrive whole within ``header_timeout`` of its first
byte, a request body that sends nothing for ``client_idle_timeout`` is cut off (408), a
client's EOF closes its idle connection at once, and an idle keep-alive connection closes
after ``KEEP_ALIVE_TIMEOUT``. Hypercorn's own ``read_timeout`` is left off: it bounds every
read for the connection's whole life, so it would cut a client waiting quietly for a long
generation or an event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h11
import hypercorn.protocol
from hypercorn.asyncio import run as hypercorn_run
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.asyncio.tcp_server import MAX_RECV
from hypercorn.asyncio.tcp_server import TCPServer as HypercornTCPServer
from hypercorn.asyncio.worker_context import AsyncioSingleTask
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol

from gpubroker.errors import HeadersTooLarge, RequestTimeout
from gpubroker.proxy.memory import trimming
from gpubroker.proxy.target import MAX_HEAD, head_size
from gpubroker.responses import send_error

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
        error = HeadersTooLarge(
            f"the request head is over {MAX_HEAD // 1024} KiB", headers=[(b"connection", b"close")]
        )
        prefix = "websocket.http" if scope["type"] == "websocket" else "http"
        await send_error(send, error, prefix=prefix)


# Idle keep-alive connections close after this. Long enough to carry a client's bursts and a
# UI's polls (1-5 s) on one connection, above the idle expiry of common client pools (httpx 5 s,
# Node's undici 4 s) so they close first and never race us; five times fewer idle sockets (file
# descriptors) held than nginx's 75 s.
KEEP_ALIVE_TIMEOUT = 15.0


class _TCPServer(HypercornTCPServer):
    """Hypercorn 0.18's connection handler, plus a header deadline and close on client EOF.

    Hypercorn's only bound on a slow head is its keep-alive timer (a head dribbled a byte at a
    time holds the connection until it fires), and a client's EOF on an idle connection left
    the socket open until then too. Here the first bytes of a head that does not complete at
    once replace the keep-alive timer by one of ``gpubroker_header_timeout`` seconds (on the
    Hypercorn config; None: Hypercorn's behaviour), which Hypercorn stops, as it stops its own,
    when the head is complete. Installed in place of Hypercorn's class (its accept callback
    looks the name up at each connection): every server in this process gets it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle_task = _IdleTimer(self)
        self.idle = True  # no request in progress: a head is awaited
        self.head_due = False  # part of a head came: the header timer runs
        self.eof = False
        self._header_s: float | None = None

    async def run(self) -> None:
        try:
            await super().run()
        except asyncio.CancelledError:
            # A connection still busy when shutdownGrace ran out is cancelled by Hypercorn.
            # Its task is asyncio's client_connected_cb, which before Python 3.13 calls
            # task.exception() on it when done and logs the CancelledError that raises as an
            # error with a traceback, one per connection cut. Nothing awaits this task and its
            # connection is closed by now, so it ends normally instead.
            pass

    async def _read_data(self) -> None:
        header_timeout = self._header_s = getattr(self.config, "gpubroker_header_timeout", None)
        while not self.reader.at_eof():
            try:
                data = await asyncio.wait_for(self.reader.read(MAX_RECV), self.config.read_timeout)
            except (ConnectionError, OSError, TimeoutError, ssl.SSLError):
                break
            await self.protocol.handle(RawData(data))
            if data and self.idle and not self.head_due and header_timeout is not None:
                # A head began and is not complete yet (a complete one makes us busy at once).
                self.head_due = True
                await self.idle_task.restart(self._task_group, self.header_timeout)
        self.eof = True
        await self.protocol.handle(Closed())
        await self.idle_task.stop()  # so the connection closes now, not when a timer fires

    async def header_timeout(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.context.terminated.wait(), self._header_s)
        await asyncio.shield(self._initiate_server_close())


class _IdleTimer(AsyncioSingleTask):
    """Hypercorn's idle-timer slot, which also tells the connection whether it is idle.

    Hypercorn restarts it with its keep-alive timer when a connection turns idle and stops it
    when a request head is complete; hooking here (rather than the connection's send path)
    costs nothing per response write.
    """

    def __init__(self, conn: _TCPServer) -> None:
        super().__init__()
        self._conn = conn

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        conn = self._conn
        if conn.eof:
            return  # nothing more can come: no keep-alive wait
        if action != conn.header_timeout:  # Hypercorn's keep-alive timer: the connection is idle
            if conn.head_due:
                return  # HTTP/2 says "idle" again per frame batch: keep the head's deadline
            conn.idle = True
        await super().restart(task_group, action)

    async def stop(self) -> None:
        self._conn.idle = self._conn.head_due = False  # a request began (or the end came)
        await super().stop()


hypercorn_run.TCPServer = _TCPServer  # type: ignore[misc]


class _Config(HypercornConfig):
    gpubroker_header_timeout: float | None = None  # read by _TCPServer


class _BodyIdleGuard:
    """Cut off a request body that sends nothing for ``timeout`` seconds (Hypercorn has no bound).

    The app is cancelled where it waits (so the proxy closes its upstream connection and gives
    up a lease), then the client gets a 408 and, its body unread, the connection closes.
    Requests that cannot have a body (HTTP/1 with neither Content-Length nor Transfer-Encoding)
    skip the guard: the proxy's fast path pays for one look at the headers.
    """

    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (
            scope.get("http_version", "1.1") in ("1.0", "1.1")
            and not any(k in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
        ):
            await self.app(scope, receive, send)
            return
        watch = _BodyWatch(receive, send, self.timeout)
        cancelled: asyncio.CancelledError | None = None
        try:
            await self.app(scope, watch.receive, watch.send)
        except asyncio.CancelledError as exc:
            cancelled = exc
        finally:
            watch.close()
        if not watch.stalled:
            if cancelled is not None:
                raise cancelled
            return
        if watch.task.uncancel() > 0 and cancelled is not None:
            raise cancelled  # cancelled from elsewhere too: that one goes on
        if not watch.started:
            text = f"the request body sent nothing for {self.timeout:g}s (clientIdleTimeout)"
            await send_error(send, RequestTimeout(text, headers=[(b"connection", b"close")]))


class _BodyWatch:
    """One request's body deadline: a single timer per request, not one per receive.

    ``receive`` notes when it starts waiting on the client; the timer, when it fires, cancels
    the app's task (natively, as ``asyncio.timeout`` does) if that wait is ``timeout`` old,
    else re-arms for what is left. A class, not closures, so no reference cycle per request.
    """

    __slots__ = ("_receive", "_send", "loop", "since", "stalled", "started", "task", "timeout",
                 "timer")  # fmt: skip

    def __init__(self, receive: Any, send: Any, timeout: float) -> None:
        self._receive = receive
        self._send = send
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.since: float | None = None  # when the pending receive began waiting
        self.stalled = self.started = False
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(timeout, self._check)

    def _check(self) -> None:
        since, now = self.since, self.loop.time()
        if since is not None and now - since >= self.timeout:
            self.stalled = True
            self.timer = None
            self.task.cancel()
        else:  # not waiting on the client now (the upstream reads slowly), or not for long
            left = self.timeout if since is None else since + self.timeout - now
            self.timer = self.loop.call_later(left, self._check)

    async def receive(self) -> dict[str, Any]:
        if self.timer is None:  # the body is complete (or cut off): nothing left to bound
            return await self._receive()  # type: ignore[no-any-return,unused-ignore]
        self.since = self.loop.time()
        try:
            message: dict[str, Any] = await self._receive()
        finally:
            self.since = None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.close()
        return message

    async def send(self, message: dict[str, Any]) -> None:
        self.started = True
        await self._send(message)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


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
    header_timeout: float | None = 10.0,
    client_idle_timeout: float | None = 60.0,
    server: str = "hypercorn",
) -> None:
    """Serve ``app`` on ``listener`` until ``shutdown_trigger`` returns, then drain in-flight work.

    Hypercorn takes ownership of the socket. In-flight requests get ``graceful_timeout`` seconds
    to finish after the trigger fires. ``own_headers=False`` leaves out Hypercorn's Date and
    Server headers (for the proxy ports, which pass the upstream's own). ``header_timeout`` and
    ``client_idle_timeout`` (None: unbounded) are the config's headerTimeout and
    clientIdleTimeout, described in the module docstring. ``server``: the config's ``server``,
    ``hypercorn`` or ``uvicorn`` (:mod:`~gpubroker.proxy.uvicorn_server`, the same bounds).
    """
    if client_idle_timeout is not None:
        app = _BodyIdleGuard(app, client_idle_timeout)
    async with trimming():  # memory a burst freed goes back to the system (memory.py)
        await SERVERS[server](
            _HeadLimit(app),
            listener,
            shutdown_trigger,
            graceful_timeout=graceful_timeout,
            own_headers=own_headers,
            header_timeout=header_timeout,
        )


async def _serve_hypercorn(
    app: Any,
    listener: Listener,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    *,
    graceful_timeout: float,
    own_headers: bool,
    header_timeout: float | None,
) -> None:
    config = _Config()
    config.bind = [f"fd://{listener.sock.detach()}"]
    config.graceful_timeout = graceful_timeout
    config.backlog = 1024  # Hypercorn listens again with its own backlog (100 by default)
    # A proxy passes the upstream's Date and Server through; adding ours would duplicate them.
    config.include_date_header = own_headers
    config.include_server_header = own_headers
    config.accesslog = None
    config.errorlog = logging.getLogger("gpubroker.http")
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.gpubroker_header_timeout = header_timeout
    config.h11_max_incomplete_size = MAX_HEAD  # a head still arriving; _HeadLimit does the rest
    config.websocket_ping_interval = None
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)


async def _serve_uvicorn(
    app: Any,
    listener: Listener,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    *,
    graceful_timeout: float,
    own_headers: bool,
    header_timeout: float | None,
) -> None:
    from gpubroker.proxy.uvicorn_server import serve_uvicorn

    await serve_uvicorn(
        app,
        listener.sock,
        shutdown_trigger,
        graceful_timeout=graceful_timeout,
        own_headers=own_headers,
        header_timeout=header_timeout,
        keep_alive_timeout=KEEP_ALIVE_TIMEOUT,
        max_head=MAX_HEAD,
    )


# The servers ``serve`` runs, by the config's ``server`` name (tests run both through this).
SERVERS: dict[str, Callable[..., Awaitable[None]]] = {
    "hypercorn": _serve_hypercorn,
    "uvicorn": _serve_uvicorn,
}
