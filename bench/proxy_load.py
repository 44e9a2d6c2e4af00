"""The bench's Python pieces that run as child processes of ``bench/proxy.py``: the asyncio
upstream (when there is no node), the closed-loop load client (when there is no wrk), the SSE
client, and the ``openai`` client rounds against a model server."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from typing import Any

SMALL = b"hello, world\n"
POST_BODY = b'{"model":"m","prompt":"hi","stream":false}'


# --- the Python upstream (used when there is no node) ---------------------------------------


class _UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive server for the bench's few routes; bodies need a Content-Length."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while not self.streaming and (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).lower()
            m = re.search(rb"\r\ncontent-length: *(\d+)", head)
            size = end + 4 + (int(m.group(1)) if m else 0)
            if len(self.buffer) < size:
                return
            del self.buffer[:size]
            target = head.split(b" ", 2)[1]
            if target.startswith((b"/sse", b"/gpu-sse")):
                self.streaming = True
                q = dict(p.split(b"=") for p in target.partition(b"?")[2].split(b"&"))
                asyncio.get_running_loop().create_task(
                    self.sse(int(q[b"n"]), int(q[b"interval"]) / 1000)
                )
            else:
                assert self.transport is not None
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n\r\n"
                    + SMALL
                )

    async def sse(self, n: int, interval: float) -> None:
        t = self.transport
        assert t is not None
        t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
        t.write(b"transfer-encoding: chunked\r\n\r\n")
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(n + 1):  # event i due at start + (i + 1) * interval, without drift
            await asyncio.sleep(max(0.0, start + (i + 1) * interval - loop.time()))
            if t.is_closing():
                return
            event = (
                f'data: {{"token":"tok{i}","t":{time.time()}}}\n\n' if i < n else "data: [DONE]\n\n"
            )
            t.write(b"%x\r\n%s\r\n" % (len(event), event.encode()))
        t.write(b"0\r\n\r\n")
        self.streaming = False


async def python_upstream() -> None:
    server = await asyncio.get_running_loop().create_server(
        _UpstreamProtocol, "127.0.0.1", 0, backlog=1024
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


# --- the load clients (child processes) -----------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    m = re.search(rb"\r\ncontent-length: *(\d+)", head.lower())
    if m:
        await reader.readexactly(int(m.group(1)))
    else:  # chunked
        while size := int(await reader.readuntil(b"\r\n"), 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    return int(head[9:12])


async def load(url: str, method: str, connections: int, duration: float) -> dict[str, Any]:
    """A closed-loop keep-alive load: each connection sends its next request on a response."""
    host, port, path = _split(url)
    body = POST_BODY if method == "POST" else b""
    request = (
        f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\n".encode()
        + (b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body) if body else b"")
        + b"\r\n"
        + body
    )
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def one() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (start := time.perf_counter()) < deadline:
                writer.write(request)
                try:
                    status = await _read_response(reader)
                except asyncio.IncompleteReadError:  # the server ended a keep-alive connection
                    writer.close()  # (Hypercorn does after 1,000 requests): as wrk does, reconnect
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                latencies.append(time.perf_counter() - start)
                errors += status >= 400
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": errors,
    }


async def sse(url: str, streams: int, events: int, interval: int) -> dict[str, Any]:
    """``streams`` concurrent SSE requests; each event's latency from its upstream timestamp."""
    host, port, path = _split(url)
    request = f"GET {path}?n={events}&interval={interval} HTTP/1.1\r\nhost: {host}\r\n\r\n"
    latencies: list[float] = []
    first_event: list[float] = []
    rates: list[float] = []
    stamp = re.compile(rb'"t":([0-9.]+)')

    async def one() -> int:
        start = time.time()
        reader, writer = await asyncio.open_connection(host, port)
        got, first, last = 0, 0.0, 0.0
        try:
            writer.write(request.encode())
            await reader.readuntil(b"\r\n\r\n")
            while size := int(await reader.readuntil(b"\r\n"), 16):
                data = await reader.readexactly(size + 2)
                last = time.time()
                for m in stamp.finditer(data):
                    latencies.append(last - float(m.group(1)))
                    got += 1
                    first = first or last
        finally:
            writer.close()
        first_event.append(first - start)
        rates.append((got - 1) / (last - first))
        return got

    started = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    first_event.sort()
    return {
        "events": sum(counts),
        "expected": streams * events,
        "eps": sum(rates),  # each stream's rate from its first event to its last, summed
        "first_p50": first_event[len(first_event) // 2] * 1000,
        "first_max": first_event[-1] * 1000,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[int(len(latencies) * 0.99)] * 1000,
        "mean": statistics.fmean(latencies) * 1000,
        "elapsed": elapsed,
    }


def _split(url: str) -> tuple[str, int, str]:
    m = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)?", url)
    assert m, url
    return m.group(1), int(m.group(2)), m.group(3) or "/"


async def openai_rounds(
    urls: list[str], rounds: int, max_tokens: int, model: str
) -> dict[str, list[dict[str, float]]]:
    """Streamed chat completions with the official ``openai`` client, interleaved: each round
    asks every URL once (in an order rotated per round), so drift in the model server's speed
    falls on all alike. TTFT: from the call to the first content delta; tokens/s: the content
    chunks after the first over the time from the first to the last."""
    import openai

    clients = {
        u: openai.AsyncOpenAI(base_url=u + "/v1", api_key="unused", max_retries=0, timeout=120)
        for u in urls
    }
    out: dict[str, list[dict[str, float]]] = {u: [] for u in urls}
    messages = [{"role": "user", "content": "Count from one to twenty in words."}]
    try:
        for r in range(rounds):
            for u in urls[r % len(urls) :] + urls[: r % len(urls)]:
                start = time.perf_counter()
                stream = await clients[u].chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens, stream=True,
                    temperature=0.0,
                )  # fmt: skip
                first = last = 0.0
                tokens = 0
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        last = time.perf_counter()
                        first = first or last
                        tokens += 1
                out[u].append(
                    {
                        "ttft": (first - start) * 1000,
                        "tps": (tokens - 1) / (last - first) if tokens > 1 else 0.0,
                        "tokens": tokens,
                    }
                )
    finally:
        for c in clients.values():
            await c.close()
    return out
