"""Waiting, visibly: SSE comments for a streaming request while it waits for the GPU.

Opt-in per backend (``progress: comments``) or per request (``X-GPUBroker-Progress: 1``), and
only for a request that will stream server-sent events: ``Accept: text/event-stream``, or an
OpenAI-style JSON body with ``"stream": true`` (the body read ahead while queued; parsed only
then), never on Ollama's own ``/api/…`` routes, whose ``stream`` (true by default) is NDJSON.
Such a request that the broker does not admit at once (it queues, or a swap runs for it: the
broker's ``on_queued``) gets its response head at once (200, ``text/event-stream``) and then a
comment a second, ``: queued 2nd behind comfyui`` or ``: swapping ollama→vllm (loading
vllm), 3.1 s``, until the upstream answers. Compliant SSE clients ignore comments; proxies and
load balancers with idle timeouts see a live connection. A request admitted at once pays for
nothing here (one closure: the opt-in is looked at only once it queues).

What the early head costs, once it is sent (``AfterHead``):

- The upstream's own head cannot follow. Its status must be 200 and its type an event stream,
  and then only its body goes on: its other headers are lost (cookies, rate-limit headers, its
  own cache-control). ``X-GPUBroker-Queue-Ms`` and ``X-GPUBroker-Swap`` come as comments.
- Every error answer the proxy would have sent instead (a refused lease: queue timeout, 507,
  shutting down; an unreachable or timed-out upstream; an upstream's own non-200 answer) ends
  the stream with an error event in OpenAI's shape, ``data: {"error": {"message", "type",
  "param", "code"}}`` then ``data: [DONE]`` (as an upstream breaking off mid-stream does), never
  a silent close. The official ``openai`` client raises it as an ``APIError``. A broker error
  is named by its own code (``queue_timeout``…), whatever shape the port renders it in.
- No ``Retry-After`` (nor any status) can be sent once the head is out: a refused lease's retry
  hint is lost, and the error event's ``code`` is all a client has to tell a retryable refusal.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.types import Message, Send

from gpubroker.errors import ClientError
from gpubroker.responses import ErrorRenderer

HEADER = b"x-gpubroker-progress"
TICK = 1.0  # s between comments
ERROR_BODY_LIMIT = 64 * 2**10  # bytes of an error answer kept to tell the client what it said
HEAD = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (HEADER, b"comments"),
]
AS_COMMENTS = (b"x-gpubroker-queue-ms", b"x-gpubroker-swap")  # head headers said as comments
DONE = b"data: [DONE]\n\n"
NDJSON_PREFIX = "/api/"  # Ollama's native routes: their ``"stream": true`` is NDJSON, not SSE

Headers = list[tuple[bytes, bytes]]


def opted_in(backend_progress: str, headers: Headers) -> bool:
    """The backend's ``progress: comments``, or the request's ``X-GPUBroker-Progress: 1``."""
    if backend_progress == "comments":
        return True
    return any(k == HEADER and v.strip() in (b"1", b"comments") for k, v in headers)


def _header(headers: Headers, name: bytes) -> bytes:
    return b", ".join(v for k, v in headers if k.lower() == name).lower()


def wants_events(headers: Headers, body: bytes | None, path: str) -> bool:
    """Whether the request asks for an event stream: by Accept, or a JSON ``"stream": true``.

    ``body`` is the whole body read ahead (None when it was too big to read ahead). The body's
    word counts on any path but Ollama's own ``/api/…``: there ``stream`` (true by default)
    asks for NDJSON, which an early event-stream head would break.
    """
    if b"text/event-stream" in _header(headers, b"accept"):
        return True
    if path.startswith(NDJSON_PREFIX):
        return False
    if body is None or b"json" not in _header(headers, b"content-type"):
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("stream") is True


def comment(text: str) -> bytes:
    """One SSE comment line (a blank line after it, so no client holds it as part of an event)."""
    return b": " + " ".join(text.splitlines()).encode() + b"\n\n"


def error_event(message: str, code: str, status: int, type_: str | None = None) -> bytes:
    """An OpenAI-shaped error event and the stream's end."""
    kind = type_ or ("invalid_request_error" if status < 500 else "server_error")
    error = {"message": message, "type": kind, "param": None, "code": code}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n" + DONE


class Progress:
    """The early head and the comments of one waiting request, until the upstream answers.

    ``decide``: whether the request streams events (it may wait for the body's read-ahead);
    ``note``: the broker's word on what the lease waits for (None once it waits no more: then
    the comment says how long the upstream has been thinking). ``run`` in a task. Once the lease
    is decided, ``admitted()`` says whether the head went (if not, it never will); ``stop()``
    ends the comments before anything else is sent (``AfterHead`` does).
    """

    def __init__(
        self,
        send: Send,
        decide: Callable[[], Awaitable[bool]],
        note: Callable[[], str | None],
        upstream: str,
        tick: float = TICK,
    ) -> None:
        self._send = send
        self._decide = decide
        self._note = note
        self._upstream = upstream
        self._tick = tick
        self._head = False  # the head is going (or went) out
        self._stopping = False
        self._waiting: anyio.CancelScope | None = None  # cancelled by stop(): never a send
        self._done = anyio.Event()

    async def run(self) -> None:
        try:
            if self._stopping:
                return
            streams = False
            with self._wait() as waiting:
                streams = await self._decide()
            if waiting.cancel_called or not streams or self._stopping:
                return
            self._head = True
            await self._send({"type": "http.response.start", "status": 200, "headers": HEAD})
            since: float | None = None  # when the broker's note ran out: the lease was decided
            while not self._stopping:
                text = self._note()
                if text is None:
                    since = anyio.current_time() if since is None else since
                    took = anyio.current_time() - since
                    text = f"waiting for {self._upstream}'s answer, {took:.1f} s"
                await self._send(
                    {"type": "http.response.body", "body": comment(text), "more_body": True}
                )
                with self._wait():
                    await anyio.sleep(self._tick)
        finally:
            self._done.set()

    def _wait(self) -> anyio.CancelScope:
        self._waiting = anyio.CancelScope()
        return self._waiting

    async def admitted(self) -> bool:
        """The lease is decided: True if the head went out (the comments go on), else False
        (they never start)."""
        if self._head:
            return True
        await self.stop()
        return self._head

    async def stop(self) -> None:
        """End the comments; returns once a send under way has ended."""
        self._stopping = True
        if self._waiting is not None:
            self._waiting.cancel()
        await self._done.wait()


class AfterHead:
    """The ``send`` of what follows the early head: it turns an answer into the stream's rest.

    Its first message stops the comments (the upstream answered, or the broker refused).

    A 200 event stream's head is dropped (its queue and swap headers said as comments) and its
    body passes on; any other answer (our own error JSON, or the upstream's) is read, bounded,
    and becomes one OpenAI-shaped error event. ``finished``: the response was ended.
    """

    def __init__(self, send: Send, progress: Progress) -> None:
        self._send = send
        self._progress = progress
        self._status = 0
        self._passing = False
        self._kept = bytearray()
        self._refusal: ClientError | None = None  # the broker's own error, when it answers
        self.finished = False

    def errors(self, render: ErrorRenderer) -> ErrorRenderer:
        """``render`` (the port's error shape), noting the broker's error it renders: so the
        error event names its code even when the shape has none (Ollama's)."""

        async def rendered(send: Send, error: ClientError, backend: str | None) -> None:
            self._refusal = error
            await render(send, error, backend)

        return rendered

    async def __call__(self, message: Message) -> None:
        await self._progress.stop()  # never a comment inside the stream's own events
        kind = message["type"]
        if kind == "http.response.start":
            headers: Headers = message.get("headers", [])
            self._status = message["status"]
            self._passing = self._status == 200 and b"text/event-stream" in _header(
                headers, b"content-type"
            )
            said = b"".join(
                comment(f"{k.decode('latin-1')}: {v.decode('latin-1')}")
                for k, v in headers
                if k in AS_COMMENTS
            )
            if said:
                await self._send({"type": "http.response.body", "body": said, "more_body": True})
            return
        if kind != "http.response.body":
            await self._send(message)
            return
        more = message.get("more_body", False)
        if self._passing:
            self.finished = not more
            await self._send(message)
            return
        if len(self._kept) < ERROR_BODY_LIMIT:
            self._kept += message.get("body", b"")[: ERROR_BODY_LIMIT - len(self._kept)]
        if not more:
            await self.end(self._error())

    async def end(self, event: bytes) -> None:
        """End the stream with ``event`` (an error event), unless it was ended already."""
        await self._progress.stop()
        if not self.finished:
            self.finished = True
            await self._send({"type": "http.response.body", "body": event, "more_body": False})

    def _error(self) -> bytes:
        """The error event for a non-stream answer, from what its body says where it can."""
        status, raw = self._status, bytes(self._kept)
        data: Any = None
        try:
            data = json.loads(raw)
        except ValueError:
            pass
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):  # OpenAI's
                code = str(error.get("code") or status)
                return error_event(error["message"], code, status, error.get("type"))
            if isinstance(error, str) and isinstance(data.get("message"), str):  # the broker's
                return error_event(data["message"], error, status)
            if isinstance(error, str) and self._refusal is not None:  # ours, in Ollama's shape
                return error_event(error, self._refusal.code, status)
            if isinstance(error, str):  # Ollama's
                return error_event(f"upstream answered {status}: {error}", "upstream_error", status)
            if isinstance(data.get("message"), str):  # vLLM's older {"object": "error", …}
                code = str(data.get("code") or "upstream_error")
                return error_event(data["message"], code, status, data.get("type"))
        text = raw.decode("utf-8", "replace").strip()[:500]
        if status == 200:
            text = "the upstream answered with no event stream" + (f": {text}" if text else "")
        else:
            text = f"upstream answered {status}" + (f": {text}" if text else "")
        return error_event(text, "upstream_error", status if status != 200 else 502)
