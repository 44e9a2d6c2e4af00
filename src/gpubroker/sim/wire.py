"""Wire formats the emulators share: NDJSON lines, SSE events, timestamps and fake model output.

Real services write compact JSON (Go's encoder, FastAPI's), so we do too; a proxy that re-encodes
bodies would show up as a byte difference in tests.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_DONE = b"data: [DONE]\n\n"
NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"

_WORDS = (" The", " GPU", " is", " shared", " fairly", " by", " the", " broker", ".")
GARBAGE_TOKEN = "\u0000garbage"
"""What a model answers after its weights were discarded and never reloaded (vllm#29341)."""


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def ndjson_line(obj: Any) -> bytes:
    return (dumps(obj) + "\n").encode()


def sse_event(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


def tokens(count: int, *, garbage: bool = False) -> list[str]:
    """``count`` fake tokens; deterministic, so tests can compare whole answers."""
    if garbage:
        return [GARBAGE_TOKEN] * count
    return [_WORDS[i % len(_WORDS)] for i in range(count)]


def embedding(text: str, dims: int = 8) -> list[float]:
    """A deterministic unit-ish vector derived from ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i] - 127.5) / 127.5, 6) for i in range(dims)]


def digest_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_utc(moment: datetime | None = None) -> str:
    """Go's RFC 3339 form with a ``Z`` suffix, as Ollama writes ``created_at``."""
    return (moment or utc_now()).isoformat().replace("+00:00", "Z")


def iso_local(moment: datetime) -> str:
    """Local time with an offset, as Ollama writes ``expires_at``."""
    return moment.astimezone().isoformat()


FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)
"""Go's ``MaxInt64`` nanoseconds, which Ollama uses for a negative keep_alive (~292 years)."""


def unix_now() -> int:
    return int(time.time())


def nanos(seconds: float) -> int:
    return int(seconds * 1e9)


class GuardedStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however the stream ends.

    A generator's own ``finally`` does not run when the client leaves before the first chunk is
    pulled, which would leak an in-flight count; this response always calls ``on_close``.
    """

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], None],
        media_type: str,
        status_code: int = 200,
    ) -> None:
        super().__init__(content, status_code=status_code, media_type=media_type)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


class SimulatedCrash(Exception):
    """Raised inside a response stream so the server aborts the connection mid-body."""
