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

    __slots__ = ("_field", "_json", "_span", "head", "model", "more")

    def __init__(
        self,
        head: bytes,
        more: bool,
        model: str,
        data: dict[str, Any] | None = None,
        span: tuple[int, int] | None = None,
        field: str = "model",
    ) -> None:
        self._field = field
        self.head = head
        self.more = more
        self.model = model
        self._json = data
        self._span = span

    def rewritten(self, model: str) -> bytes:
        """``head`` with the model named ``model`` instead: only the name's bytes change (a
        JSON body is re-serialised only when its value's span cannot be found)."""
        if self._json is not None:
            span = _value_span(self.head, self._field)
            if span is None:
                return json.dumps({**self._json, self._field: model}).encode()
            start, end = span
            return self.head[:start] + json.dumps(model).encode() + self.head[end:]
        assert self._span is not None
        start, end = self._span
        return self.head[:start] + model.encode() + self.head[end:]


_SPACE = re.compile(r"[ \t\n\r]*")


def _value_span(raw: bytes, field: str) -> tuple[int, int] | None:
    """The byte span of the top-level ``field``'s value in the JSON object ``raw`` (its last,
    as ``json.loads`` takes the last of duplicate keys); None when not found safely."""
    try:
        text = raw.decode("utf-8")
        decoder = json.JSONDecoder()
        i = _SPACE.match(text, 0).end()  # type: ignore[union-attr]
        if text[i : i + 1] != "{":
            return None
        i = _SPACE.match(text, i + 1).end()  # type: ignore[union-attr]
        found: tuple[int, int] | None = None
        while text[i : i + 1] == '"':
            key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
            i = _SPACE.match(text, i).end()  # type: ignore[union-attr]
            if text[i : i + 1] != ":":
                return None
            start = _SPACE.match(text, i + 1).end()  # type: ignore[union-attr]
            value, i = decoder.raw_decode(text, start)
            if key == field:
                found = (start, i) if isinstance(value, str) else None
            i = _SPACE.match(text, i).end()  # type: ignore[union-attr]
            if text[i : i + 1] == "}":
                if found is None:
                    return None
                start = len(text[: found[0]].encode())
                return start, start + len(text[found[0] : found[1]].encode())
            if text[i : i + 1] != ",":
                return None
            i = _SPACE.match(text, i + 1).end()  # type: ignore[union-attr]
    except ValueError:
        return None
    return None


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
    used = field if isinstance(data.get(field), str) else "model"
    return Read(raw, False, model, data, field=used)


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
