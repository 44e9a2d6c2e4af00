"""HTTP/1.1 on one upstream socket: its buffer and backpressure, and the heads on the wire.

:class:`Connection` is the asyncio protocol the pool in :mod:`~gpubroker.proxy.upstream` keeps
(a receive buffer, a waiter for more bytes, pausing reads past ``READ_PAUSE``, write drain).
:func:`request_head` writes a request head, :func:`read_head` reads a response head strictly (no
obs-fold, no malformed lines) and :func:`framing` decides how its body is framed. ``Closed`` and
``Silent`` are the connection's own failures; the pool turns them into ``UpstreamError`` and
``UpstreamTimeout`` with the upstream's name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable

from gpubroker.errors import BadUpstreamResponse

MAX_HEAD = 64 * 1024  # response head (status line + headers) and chunk-size lines
READ_PAUSE = 256 * 1024  # stop reading the socket with this much unread; resume below a quarter

BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE = range(4)  # response body framings


class Silent(Exception):
    """No body byte arrived within the upstream's idle timeout."""


class Closed(Exception):
    """The connection ended (or went wrong) while more bytes were needed.

    ``stale``: it ended before any byte of the response, so the request may be sent again.
    """

    def __init__(self, message: object, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


class Connection(asyncio.Protocol):
    """One upstream socket: a receive buffer, a waiter for more bytes, and write backpressure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: Exception | None = None
        self.idle_since = 0.0
        self.quiet_since = 0.0  # the last byte's arrival, or the start of the current wait
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._reading = True

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's TCPTransport has the Transport methods without subclassing it)
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.quiet_since = time.monotonic()
        if self._reading and len(self.buffer) > READ_PAUSE and self.transport is not None:
            self.transport.pause_reading()
            self._reading = False
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = self.error or exc
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- used by the client ---------------------------------------------------------------

    @property
    def usable(self) -> bool:
        t = self.transport
        return not self.eof and not self.buffer and t is not None and not t.is_closing()

    async def fill(self) -> bool:
        """Wait for more bytes; False when the peer has closed (nothing more will come)."""
        if self.eof:
            return False
        if not self._reading and self.transport is not None:
            self.transport.resume_reading()
            self._reading = True
        before = len(self.buffer)
        self.quiet_since = time.monotonic()  # we were busy until now, not waiting on the peer
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        return len(self.buffer) > before

    def silent_for(self, idle: float) -> float:
        """Fail the pending wait if nothing came for ``idle`` s; else how long until it may."""
        left = self.quiet_since + idle - time.monotonic()
        waiter = self._waiter
        if left <= 0 and waiter is not None and not waiter.done():
            waiter.set_exception(Silent())
            return 0.0
        return left if left > 0 else idle

    def take(self, n: int) -> bytes:
        """Up to ``n`` buffered bytes, removed from the buffer."""
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        if not self._reading and len(self.buffer) < READ_PAUSE // 4 and self.transport:
            self.transport.resume_reading()
            self._reading = True
        return data

    def write(self, data: bytes) -> None:
        if self.eof or self.transport is None or self.transport.is_closing():
            raise Closed(self.error or "connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain
        if self.eof:
            raise Closed(self.error or "connection closed")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def request_head(
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: AsyncIterable[bytes] | None,
    netloc: bytes,
) -> tuple[bytes, bool, bool]:
    """The request line and headers as one bytes; whether the body goes chunked; close asked."""
    lines = [b"%s %s HTTP/1.1" % (method.encode(), target or b"/")]
    has_host = has_length = close = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"host":
            has_host = True
        elif lname == b"content-length":
            has_length = True
        elif lname == b"transfer-encoding":
            continue  # we frame the body ourselves
        elif lname == b"connection" and b"close" in value.lower():
            close = True
        lines.append(name + b": " + value)
    if not has_host:
        lines.append(b"host: " + netloc)
    chunked = body is not None and not has_length
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    lines.append(b"\r\n")
    return b"\r\n".join(lines), chunked, close


async def read_head(
    conn: Connection, interim: bool
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status, HTTP version and headers of the next response head on ``conn``.

    The ``Closed`` raised when the connection ends before any response byte (none after an
    ``interim`` 1xx head either) is marked stale.
    """
    buf = conn.buffer
    while (end := buf.find(b"\r\n\r\n")) < 0 or end > MAX_HEAD:
        if len(buf) > MAX_HEAD:
            raise Closed(f"response head larger than {MAX_HEAD // 1024} KiB")
        if not await conn.fill():
            if buf or interim:
                raise Closed("connection closed inside the response head")
            why = f": {conn.error}" if conn.error else ""
            raise Closed(f"connection closed before the response{why}", stale=True)
    lines = bytes(buf[:end]).split(b"\r\n")
    del buf[: end + 4]
    version, _, rest = lines[0].partition(b" ")
    try:
        status = int(rest[:3])
    except ValueError:
        raise Closed(f"malformed status line {lines[0][:80]!r}") from None
    if not version.startswith(b"HTTP/1.") or not 100 <= status <= 999:
        raise Closed(f"malformed status line {lines[0][:80]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):  # obs-fold: the next hop may read it as a header of its own
            raise BadUpstreamResponse(f"obs-fold continuation line {line[:80]!r}")
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in (b" ", b"\t"):
            raise BadUpstreamResponse(f"malformed header line {line[:80]!r}")
        headers.append((name.lower(), value.strip()))
    return status, version, headers


def framing(
    method: str, status: int, version: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[int, int, bool]:
    """How a response's body is framed (a ``BODY_*`` mode and its Content-Length) and whether
    the upstream lets the connection persist; raises BadUpstreamResponse for a head that
    frames its body ambiguously."""
    length, mode, te = 0, BODY_CLOSE, b""
    persistent = version == b"HTTP/1.1"
    for name, value in headers:
        if name == b"content-length":
            try:
                n = int(value)
            except ValueError:
                raise BadUpstreamResponse(f"bad Content-Length {value!r}") from None
            if n < 0 or (mode == BODY_LENGTH and n != length):
                raise BadUpstreamResponse(f"bad Content-Length {value!r}")
            length, mode = n, BODY_LENGTH
        elif name == b"transfer-encoding":
            te = value.lower()
        elif name == b"connection":
            tokens = value.lower()
            persistent = b"close" not in tokens and (persistent or b"keep-alive" in tokens)
    if te:
        if mode == BODY_LENGTH:  # RFC 9112 6.3: a smuggling vector; never guess which one wins
            raise BadUpstreamResponse("both Content-Length and Transfer-Encoding")
        mode = BODY_CHUNKED if te.rsplit(b",", 1)[-1].strip() == b"chunked" else BODY_CLOSE
    if method == "HEAD" or status in (204, 304):
        mode = BODY_NONE
    elif status == 101:
        mode = BODY_CLOSE  # the connection is now something else's
    return mode, length, persistent
