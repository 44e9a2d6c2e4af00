"""Read a request body just far enough to find its ``model``, then hand it on unchanged.

A JSON body is read whole (the name may be anywhere in it), up to ``apiBodyLimit``; a
multipart body (audio uploads) only up to the end of its ``model`` field, the rest streams on
from the client as it arrives. What was read is replayed to the proxy by :class:`Replay`, with
the model name rewritten when an alias maps to another upstream name (Content-Length fixed).
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.types import Message, Receive

from gpubroker.errors import BadRequest, BodyTooLarge, ClientGone

Headers = list[tuple[bytes, bytes]]


class Replay:
    """An ASGI ``receive`` that gives ``head`` first, then the client's own messages."""

    __slots__ = ("_head", "_more", "_receive")

    def __init__(self, head: bytes, more: bool, receive: Receive) -> None:
        self._head: bytes | None = head
        self._more = more
        self._receive = receive

    async def __call__(self) -> Message:
        if self._head is not None:
            head, self._head = self._head, None
            return {"type": "http.request", "body": head, "more_body": self._more}
        return await self._receive()


class Read:
    """What was read of a body: ``head`` (all of it unless ``more``) and the model named."""

    __slots__ = ("_json", "_span", "head", "model", "more")

    def __init__(
        self,
        head: bytes,
        more: bool,
        model: str,
        data: dict[str, Any] | None = None,
        span: tuple[int, int] | None = None,
    ) -> None:
        self.head = head
        self.more = more
        self.model = model
        self._json = data
        self._span = span

    def rewritten(self, model: str) -> bytes:
        """``head`` with the model named ``model`` instead."""
        if self._json is not None:
            return json.dumps({**self._json, "model": model}).encode()
        assert self._span is not None
        start, end = self._span
        return self.head[:start] + model.encode() + self.head[end:]


async def _chunk(receive: Receive) -> tuple[bytes, bool]:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    return message.get("body", b""), message.get("more_body", False)


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(
        f"the request body is over apiBodyLimit ({limit} bytes) before its model; raise "
        "apiBodyLimit, or send to the backend's own proxyPort"
    )


async def read_json(receive: Receive, limit: int, field: str = "model") -> Read:
    """The whole JSON body; raises BodyTooLarge past ``limit``, BadRequest without a model."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        chunk, more = await _chunk(receive)
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadRequest("the request body must be JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    model = data.get(field)
    if field != "model" and model is None:
        model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(f"the request names no model (a non-empty string `{field}`)")
    return Read(raw, False, model, data)


# The model field's part head: its name must end there (not ``model_id``, not ``models``).
_DISPOSITION = re.compile(
    rb'content-disposition:[ \t]*form-data;[ \t]*name="?model"?(?=[ \t]*(?:;|\r\n))[^\r\n]*\r\n'
    rb"(?:[^\r\n]+\r\n)*\r\n",
    re.IGNORECASE,
)
# Each new chunk is searched from this far back, so a part head split across chunks is seen
# while the whole upload is scanned once (a part head longer than this is not).
_OVERLAP = 16 * 1024


def boundary_of(headers: Headers) -> bytes | None:
    ctype = next((v for k, v in headers if k == b"content-type"), b"")
    if not ctype.lower().startswith(b"multipart/form-data"):
        return None
    m = re.search(rb'boundary="?([^";]+)"?', ctype, re.IGNORECASE)
    return m.group(1) if m else None


async def read_multipart(receive: Receive, limit: int, boundary: bytes) -> Read:
    """The body up to the end of its ``model`` field (the rest is left to stream on).

    Each chunk is searched once (plus ``_OVERLAP``): a model field after a large file costs
    one pass over it, not one per chunk, so the event loop is not held."""
    head = bytearray()
    more = True
    end_mark = b"\r\n--" + boundary
    scanned = 0  # head[:scanned] was searched already
    value: int | None = None  # where the model field's value starts, once its head is found
    value_from = 0  # where to look for the value's end next
    while True:
        if value is None:
            m = _DISPOSITION.search(head, max(0, scanned - _OVERLAP))
            if m is not None:
                value = value_from = m.end()
        if value is not None:
            end = head.find(end_mark, value_from)
            if end >= 0:
                model = head[value:end].decode("utf-8", "replace").strip()
                if not model:
                    break
                return Read(bytes(head), more, model, span=(value, end))
            value_from = max(value, len(head) - len(end_mark) + 1)
        scanned = len(head)
        if not more:
            break
        if len(head) > limit:
            raise _too_large(limit)
        chunk, more = await _chunk(receive)
        head += chunk
    raise BadRequest("the form names no model (a `model` field)")


def with_length(headers: Headers, delta: int) -> Headers:
    """``headers`` with Content-Length grown by ``delta`` (unchanged when there is none)."""
    if not delta:
        return headers
    out: Headers = []
    for k, v in headers:
        if k == b"content-length" and v.strip().isdigit():
            v = b"%d" % (int(v) + delta)
        out.append((k, v))
    return out
