"""The per-backend proxy: a raw ASGI app that forwards every request and WebSocket upstream.

Bodies stream both ways with backpressure and are never held whole. A request its backend's
classifier calls GPU work first takes a lease from the broker; the lease is held until the
response body has been sent to the end, or the client has gone away. Everything else passes
straight through. What goes upstream is what was classified: one normal-form target
(target.py), one framing, and nothing the broker refuses itself (``_target``).

A client that leaves releases its upstream connection at once (closed, as the upstream must
learn that nobody reads its answer), whether it waits for a lease, for the head, or reads the
body. A response is never passed on as complete when it is not: an upstream that breaks off
(or goes silent for ``upstreamIdleTimeout``) ends an event stream with an error event, and
aborts any other response's connection, as nginx and Go's ReverseProxy do.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

from gpubroker.config.model import BackendConfig
from gpubroker.errors import (
    BadRequest,
    BadUpstreamResponse,
    ClientError,
    ClientGone,
    LoopDetected,
    MethodNotAllowed,
    Refused,
    UpstreamError,
)
from gpubroker.plugins.classifiers.base import Classifier
from gpubroker.proxy.caller import caller_of
from gpubroker.proxy.forwarding import (
    MAX_HOPS,
    request_headers,
    response_headers,
    sent_host,
    via_hops,
)
from gpubroker.proxy.lease import Lease, LeaseBroker
from gpubroker.proxy.progress import AfterHead, Progress, error_event, opted_in, wants_events
from gpubroker.proxy.target import normalise, route_variants
from gpubroker.proxy.upstream import Upstream, UpstreamResponse
from gpubroker.proxy.websocket import proxy_websocket
from gpubroker.responses import ErrorRenderer, json_error

log = logging.getLogger("gpubroker.proxy.app")


QUEUED_BODY_LIMIT = 8 * 2**20  # bytes read ahead while queued, so a disconnect can be noticed
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})  # a reverse proxy tunnels and echoes nothing
ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
CLOSE = (b"connection", b"close")  # after a request whose framing we refused
WATCH_AFTER = 0.05  # s: a head slower than this gets a watcher for the client leaving
BROKE_OFF = "the upstream broke off the response"  # after the early head (progress.py)


class RequestBody:
    """The client's request body as an async iterator, with read-ahead while queued.

    While a GPU request waits in the queue we read its body ahead (up to a bound), because the
    ASGI server reports a client's disconnect only after the body messages before it.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._buffered: list[bytes] = []  # (few chunks, if any: a deque costs ~600 bytes)
        self._size = 0
        self.complete = False
        self.disconnected = False
        self._ahead_over = False  # read_ahead() ended
        self._ahead: anyio.Event | None = None  # made only when someone waits for that

    async def _next(self) -> bytes | None:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
            raise ClientGone
        if not message.get("more_body", False):
            self.complete = True
        return message.get("body", b"")

    async def read_ahead(self) -> None:
        """Read and keep body chunks until complete or the bound; raise ClientGone on leave."""
        try:
            while not self.complete and self._size < QUEUED_BODY_LIMIT:
                chunk = await self._next()
                if chunk:
                    self._buffered.append(chunk)
                    self._size += len(chunk)
        finally:
            self._ahead_over = True
            if self._ahead is not None:
                self._ahead.set()

    async def read_ahead_body(self) -> bytes | None:
        """Once ``read_ahead`` has ended: the whole body, if it was read ahead, else None."""
        if not self._ahead_over:
            if self._ahead is None:
                self._ahead = anyio.Event()
            await self._ahead.wait()
        return b"".join(self._buffered) if self.complete else None

    async def ended_empty(self) -> bool:
        """Whether the body turns out empty; reads up to its first bytes (kept for the upstream).

        HTTP/2 ends a body with END_STREAM, not with a header, so this is how to tell.
        """
        while not self._buffered and not self.complete:
            chunk = await self._next()
            if chunk:
                self._buffered.append(chunk)
                self._size += len(chunk)
        return not self._buffered

    async def wait_disconnect(self) -> None:
        """After the body is read: return when the client goes away."""
        while not self.disconnected:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._buffered:  # handed over whole: popping a list's front is quadratic
            chunks, self._buffered = self._buffered, []
            for piece in chunks:
                yield piece
        while not self.complete:
            chunk = await self._next()
            if chunk:
                yield chunk


class ProxyApp:
    """One backend's proxy (ASGI). ``upstream`` does the HTTP; ``broker`` hands out leases."""

    def __init__(
        self,
        backend: BackendConfig,
        classifier: Classifier,
        broker: LeaseBroker,
        upstream: Upstream,
    ) -> None:
        self.backend = backend
        self.classifier = classifier
        self.broker = broker
        self.upstream = upstream
        self.name = backend.name
        self._upstream_host = sent_host(backend)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket" and via_hops(scope["headers"]) >= MAX_HOPS:
            await send({"type": "websocket.http.response.start", "status": 508, "headers": []})
            await send({"type": "websocket.http.response.body", "body": b"loop detected"})
            return
        if kind == "http":
            await self.http(scope, receive, send)
        elif kind == "websocket":
            await proxy_websocket(self.backend, scope, receive, send)
        elif kind == "lifespan":
            await answer_lifespan(receive, send)

    async def http(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        errors: ErrorRenderer = json_error,
        caller: str | None = None,
        model: str | None = None,
    ) -> None:
        """One HTTP exchange, under a lease when it is GPU work. ``errors`` renders every error
        the broker itself answers; ``caller``: who asks, as status and events show it (None:
        the client's own name for itself, else its address); ``model``: the catalogue's name
        for what it asks for (the api port knows it)."""
        method: str = scope["method"]
        try:
            target, variants = self._target(scope)
        except ClientError as reject:
            await errors(send, reject, self.name)
            return
        path = variants[0]
        body = RequestBody(receive)
        if not any(self.classifier.is_gpu(method, p) for p in variants):
            self.broker.record_passthrough(self.name)
            await self.forward(scope, target, body, send, None, errors=errors)
            return
        if caller is None:
            caller = caller_of(scope["headers"], scope.get("client"))
        # Nothing is spent on noticing a client that leaves unless the lease has to wait
        # (_QueueWatch): admitted at once, the exchange is watched as a passthrough is.
        watch = _QueueWatch(self, scope, path, body, send)
        try:
            await self._leased(scope, target, path, body, send, watch, errors, caller, model)
        except asyncio.CancelledError:
            if watch.left and watch.task is not None and watch.task.uncancel() == 0:
                return  # the client left (while queued, or during a watched exchange)
            raise
        finally:
            await watch.aclose()

    async def _leased(
        self,
        scope: Scope,
        target: bytes,
        path: str,
        body: RequestBody,
        send: Send,
        watch: _QueueWatch,
        errors: ErrorRenderer,
        caller: str,
        model: str | None,
    ) -> None:
        """The GPU request's exchange under its lease (``http``'s second half)."""
        ahead = None
        if self.broker.wants_body(self.name):
            # A strategy that sizes requests by what they ask (a model, its context, a
            # workflow's files) reads the body first, up to the read-ahead bound.
            try:
                await body.read_ahead()
            except ClientGone:
                return
            ahead = await body.read_ahead_body()
        async with contextlib.AsyncExitStack() as stack:
            grant: Lease | None = None
            refusal: Refused | None = None
            try:
                grant = await stack.enter_async_context(
                    self.broker.lease(
                        self.name,
                        path,
                        method=scope["method"],
                        caller=caller,
                        model=model,
                        body=ahead,
                        on_queued=watch.queued,
                    )
                )
            except Refused as refused:
                refusal = refused
            progress = watch.progress
            if progress is not None and await progress.admitted():  # the head is out
                send = AfterHead(send, progress)  # the rest is its body
                errors = send.errors(errors)  # a broker error's event names its code
            # The watcher, once the body is read, only waits for a disconnect: it is kept for
            # the whole exchange, so a client that leaves (even before the upstream's first
            # byte, as with a non-streaming generation) ends the lease at once. Otherwise it
            # stops here (forward() reads the rest of a body too big to read ahead).
            watched = await watch.decided(keep=grant is not None and body.complete)
            if refusal is not None:
                await errors(send, refusal, self.name)
            elif grant is not None:
                await self.forward(scope, target, body, send, grant, watched=watched, errors=errors)
            if isinstance(send, AfterHead):  # never a silent close after the early head
                await send.end(error_event(BROKE_OFF, "upstream_error", 502, "upstream_error"))

    def _progress(
        self, scope: Scope, path: str, body: RequestBody, send: Send, lease: int
    ) -> Progress:
        """The comments for ``lease``, sent if the request streams events (progress.py);
        ``path`` is the one classified."""

        async def decide() -> bool:
            headers = scope["headers"]
            if wants_events(headers, None, path):  # by Accept: no need to wait for the body
                return True
            return wants_events(headers, await body.read_ahead_body(), path)

        return Progress(send, decide, functools.partial(self.broker.progress, lease), self.name)

    @staticmethod
    def _target(scope: Scope) -> tuple[bytes, tuple[str, ...]]:
        """The target to forward and the paths to classify; raises the ClientError to answer.

        What the upstream gets must be what was classified, framed as the client framed it:
        one normal-form target (target.py), and never two framings (RFC 9112 §6.3: a request
        with both Content-Length and Transfer-Encoding was de-chunked by the server, so its
        Content-Length no longer describes the body; forwarded, the rest of the body would
        be read upstream as a request of its own, with no lease).
        """
        method: str = scope["method"]
        if method in REFUSED_METHODS:
            raise MethodNotAllowed(f"{method} is not proxied", headers=[(b"allow", ALLOW)])
        headers = scope["headers"]
        if via_hops(headers) >= MAX_HOPS:
            raise LoopDetected(
                f"the request already passed {MAX_HOPS} gpubroker proxies: an upstream points "
                "back at a broker",
            )
        lengths = {v.strip() for k, v in headers if k == b"content-length"}
        codings = [v for k, v in headers if k == b"transfer-encoding"]
        if codings and (len(codings) > 1 or codings[0].strip().lower() != b"chunked"):
            # Only chunked is de-chunked by every server we run on (h11 refuses the rest with
            # 501; httptools would hand the still-coded body on): never forward it re-framed.
            raise BadRequest("only Transfer-Encoding: chunked is accepted", headers=[CLOSE])
        if lengths and codings:
            raise BadRequest(
                "a request must not have both Content-Length and Transfer-Encoding",
                headers=[CLOSE],
            )
        if len(lengths) > 1 or (lengths and not next(iter(lengths)).isdigit()):
            raise BadRequest("conflicting Content-Length values", headers=[CLOSE])
        path = normalise(scope.get("raw_path") or scope["path"].encode())  # or BadTarget
        if path == b"*" and method != "OPTIONS":
            raise BadRequest("the * target is for OPTIONS only")
        query = scope.get("query_string")
        return (path + b"?" + query if query else path), route_variants(path)

    async def forward(
        self,
        scope: Scope,
        target: bytes,
        body: RequestBody,
        send: Send,
        grant: Lease | None,
        *,
        watched: bool = False,
        errors: ErrorRenderer = json_error,
    ) -> None:
        """Send the request upstream and stream the answer back.

        ``target`` is the normalised one from ``_target``. ``watched``: the caller already
        watches for the client leaving (and cancels us).
        """
        method: str = scope["method"]
        headers = request_headers(scope, self._upstream_host)
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        length = next((v for k, v in raw if k == b"content-length"), None)
        has_body = length is not None or any(k == b"transfer-encoding" for k, _ in raw)
        if length is not None:  # exactly one, as the server framed the body ("005" -> "5")
            n = b"%d" % int(length)
            if [v for k, v in headers if k == b"content-length"] != [n]:  # or named in Connection
                headers = [(k, v) for k, v in headers if k != b"content-length"]
                headers.append((b"content-length", n))
        if not scope.get("http_version", "1.1").startswith("1"):
            cookies = [v for k, v in headers if k == b"cookie"]
            if len(cookies) > 1:  # h2 splits Cookie per crumb; HTTP/1.1 wants one (RFC 9113)
                headers = [(k, v) for k, v in headers if k != b"cookie"]
                headers.append((b"cookie", b"; ".join(cookies)))
            if not has_body:  # HTTP/2 (and 3) may send a body with no Content-Length
                try:
                    has_body = not await body.ended_empty()
                except ClientGone:
                    return
        extra: list[tuple[bytes, bytes]] = []
        if grant is not None:
            extra.append((b"x-gpubroker-queue-ms", str(round(grant.queued_s * 1000)).encode()))
            if grant.swap is not None:
                extra.append((b"x-gpubroker-swap", grant.swap.header().encode()))
        try:
            response = await self._open(method, target, headers, body, has_body, watched)
            if response is None:
                return  # the client left before the head came
        except ClientGone:
            return
        except UpstreamError as exc:  # unreachable, timed out, or a head not fit to pass on
            self.broker.record_upstream_error(self.name)
            if isinstance(exc, BadUpstreamResponse):
                log.warning("%s: refused a bad upstream response: %s", self.name, exc)
            await errors(send, exc, self.name)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response_headers(response.headers) + extra,
                }
            )
            lease = grant.lease if grant else None
            await self._stream(
                body, send, response, lease, watch=not watched and (body.complete or not has_body)
            )
        finally:
            with anyio.CancelScope(shield=True):  # close it even when the client left
                await response.aclose()

    async def _open(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: RequestBody,
        has_body: bool,
        watched: bool,
    ) -> UpstreamResponse | None:
        """``upstream.open()``; None when the client left first (the connection is then closed).

        Unless the caller watches already, a client leaving while we wait for the head cancels
        the wait: else each abandoned request would pin an upstream connection (and a pool
        slot) until upstreamTimeout. A watcher costs a task, so it starts only once the head is
        WATCH_AFTER late, and it cancels this task natively (as ``asyncio.timeout`` does): the
        common fast answer pays for one timer and one small object (~3 us), not a task or a
        cancel scope.
        """
        source = body if has_body else None
        if watched:
            return await self.upstream.open(method, target, headers, source)
        watch = _LeaveWatch(body, has_body)
        try:
            return await self.upstream.open(method, target, headers, source)
        except asyncio.CancelledError:
            if watch.left and watch.task.uncancel() == 0:  # ours alone: open() closed its conn
                return None
            raise
        finally:
            watch.close()

    async def _stream(
        self,
        body: RequestBody,
        send: Send,
        response: Any,
        lease: int | None = None,
        watch: bool = True,
    ) -> None:
        """Copy the response body to the client until it ends or the client leaves."""
        whole = response.buffered_body()
        if whole is not None:  # arrived with the head: one send, nothing to watch meanwhile
            await send({"type": "http.response.body", "body": whole, "more_body": False})
            if lease is not None and whole:
                self.broker.first_byte(lease)
            return
        # Nothing left to read but a disconnect: notice the client leaving (a stream that
        # outlasts WATCH_AFTER gets a watcher task; one that ends sooner, none).
        watcher = _LeaveWatch(body, False) if watch else None
        tail: bytes | None = None
        try:
            try:
                async for chunk in response.body():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if lease is not None:  # once per GPU request: the event stream's first byte
                        self.broker.first_byte(lease)
                        lease = None
            except UpstreamError as exc:
                self.broker.record_upstream_error(self.name)
                log.warning("%s: upstream failed mid-stream: %s", self.name, exc)
                tail = _stream_error_tail(response.headers, str(exc))
                if not tail or any(k == b"content-length" for k, _ in response.headers):
                    # Leaving the response unfinished makes the server drop the connection
                    # (no terminating chunk, or short of the Content-Length), so the client
                    # sees the truncation just as it would from the upstream itself, never a
                    # complete-looking wrong body.
                    return
            if tail is not None:  # (outside the handler: a client leaving now is caught below)
                # An event stream's client reads the error event; then the stream ends cleanly.
                await send({"type": "http.response.body", "body": tail, "more_body": True})
        except asyncio.CancelledError:
            if watcher is not None and watcher.left and watcher.task.uncancel() == 0:
                return  # the client left: ours alone (forward() closes the upstream's side)
            raise
        finally:
            if watcher is not None:
                watcher.close()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _QueueWatch:
    """A GPU request's watch for its client leaving, set up only if the lease has to wait.

    ``queued`` (the broker's ``on_queued``, called inside ``lease()`` only when the lease is not
    admitted at once) starts a task that reads the body ahead (up to the bound: the server
    reports a disconnect only after the body messages before it) and then waits for the
    client to leave, and cancels the request's task natively when it does (as ``asyncio.timeout``
    does; ``left`` tells that cancel apart). It also starts the progress comments where the
    client opted in. A lease admitted at once pays for this object only: no task, no task
    group (they cost ~100 us of a ~230 us leased request, measured with bench/proxy.py).
    """

    __slots__ = ("active", "app", "body", "left", "path", "progress", "scope", "send", "task",
                 "tasks")  # fmt: skip

    def __init__(self, app: ProxyApp, scope: Scope, path: str, body: RequestBody, send: Send):
        self.app = app
        self.scope = scope
        self.path = path
        self.body = body
        self.send = send
        self.task: asyncio.Task[Any] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.progress: Progress | None = None
        self.active = False  # the watcher may cancel the request's task
        self.left = False

    def queued(self, lease: int) -> None:
        loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.active = True
        self._start(loop, self._watch())
        app = self.app
        if opted_in(app.backend.progress, self.scope["headers"]):
            self.progress = app._progress(self.scope, self.path, self.body, self.send, lease)
            self._start(loop, self.progress.run())

    def _start(self, loop: asyncio.AbstractEventLoop, coro: Any) -> None:
        task = loop.create_task(coro)
        task.add_done_callback(_log_failure)
        self.tasks.append(task)

    async def _watch(self) -> None:
        body = self.body
        try:
            await body.read_ahead()
            if not body.complete:
                return  # larger than the read-ahead bound: cannot watch without buffering it
            await body.wait_disconnect()
        except ClientGone:
            pass
        if self.active and self.task is not None:
            self.left = True
            self.task.cancel()

    async def decided(self, keep: bool) -> bool:
        """The lease is decided: keep watching through the exchange (True: the watcher only
        waits for a disconnect now), or stop; whether the exchange is watched."""
        if not self.tasks:
            return False
        if keep:
            return True
        await self.aclose()
        return False

    async def aclose(self) -> None:
        """Stop the watcher (and the comments) and wait until they have: as a task group
        would, so none outlives the request (a connection the server closes after it)."""
        self.active = False  # never a cancel once the exchange is over
        tasks = self.tasks
        if not tasks:
            return
        self.tasks = []
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a request's watcher failed", exc_info=task.exception())


class _LeaveWatch:
    """While a response head is awaited, or its body streams: after WATCH_AFTER, a task that
    cancels the waiting task if the client leaves. Not an anyio task group: per stream that
    took ~2 KiB more, and a host task's switches. A class with bound methods, not closures: a
    closure that re-arms its own timer references itself, and a reference cycle per request
    cost ~10 us of garbage collection on the passthrough path (measured)."""

    __slots__ = ("body", "has_body", "left", "loop", "task", "timer", "waiting", "watcher")

    def __init__(self, body: RequestBody, has_body: bool) -> None:
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.body = body
        self.has_body = has_body
        self.waiting = True
        self.left = False
        self.watcher: asyncio.Task[None] | None = None
        self.timer = self.loop.call_later(WATCH_AFTER, self._start)

    def _start(self) -> None:
        if self.has_body and not self.body.complete:  # reading the body notices a leave itself
            self.timer = self.loop.call_later(WATCH_AFTER, self._start)
        else:
            self.watcher = self.loop.create_task(self._watch())

    async def _watch(self) -> None:
        await self.body.wait_disconnect()
        if self.waiting:  # never a cancel that would land after the head came
            self.left = True
            self.task.cancel()

    def close(self) -> None:
        self.waiting = False
        self.timer.cancel()  # (also drops the handle's reference to us)
        if self.watcher is not None:
            self.watcher.cancel()


def _stream_error_tail(headers: list[tuple[bytes, bytes]], message: str) -> bytes:
    """A last event telling a streaming client the upstream died, in the stream's own format."""
    ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"").lower()
    text = f"upstream closed the stream early: {message}"
    if b"text/event-stream" in ctype:
        error = json.dumps(
            {"error": {"message": text, "type": "upstream_error", "code": "upstream_error"}}
        )
        return f"data: {error}\n\ndata: [DONE]\n\n".encode()
    if b"ndjson" in ctype:
        return (json.dumps({"error": text}) + "\n").encode()
    return b""


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI lifespan: these raw apps have nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
