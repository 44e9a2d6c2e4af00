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
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hypercorn.asyncio import run as hypercorn_run
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.asyncio.tcp_server import MAX_RECV
from hypercorn.asyncio.tcp_server import TCPServer as HypercornTCPServer
from hypercorn.asyncio.worker_context import AsyncioSingleTask
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData

from .responses import send_error

ASGIApp = Callable[..., Awaitable[None]]

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
            await send_error(
                send,
                408,
                "request_timeout",
                text,
                backend=None,
                retryable=False,
                headers=[(b"connection", b"close")],
            )


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
            return await self._receive()  # type: ignore[no-any-return]
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
) -> None:
    """Serve ``app`` on ``listener`` until ``shutdown_trigger`` returns, then drain in-flight work.

    Hypercorn takes ownership of the socket. In-flight requests get ``graceful_timeout`` seconds
    to finish after the trigger fires. ``own_headers=False`` leaves out Hypercorn's Date and
    Server headers (for the proxy ports, which pass the upstream's own). ``header_timeout`` and
    ``client_idle_timeout`` (None: unbounded) are the config's headerTimeout and
    clientIdleTimeout, described in the module docstring.
    """
    if client_idle_timeout is not None:
        app = _BodyIdleGuard(app, client_idle_timeout)
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
    config.h11_max_incomplete_size = 64 * 1024  # the largest request head (h11 answers 431)
    config.websocket_ping_interval = None
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)
