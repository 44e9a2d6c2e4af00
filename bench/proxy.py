"""How much does gpubroker's proxy cost? Direct vs through the broker, on loopback, in one run.

    .venv/bin/python bench/proxy.py                  # the lean client (gpubroker.proxy.upstream)
    .venv/bin/python bench/proxy.py --compare httpx  # and the old httpx client, for reference
    .venv/bin/python bench/proxy.py --only "c16|SSE" --duration 5  # some cases, longer

Pieces, each in its own process so none shares a GIL with another:

- upstream: a tiny Node HTTP server when ``node`` is installed (closest to the services we front),
  else a raw asyncio one (``--python-upstream`` forces it). ``GET /small``, ``POST /small`` and
  ``POST /gpu`` answer 13 bytes; ``GET /sse?n=&interval=`` streams ``n`` token events, one every
  ``interval`` ms (on a fixed schedule, like a GPU-bound token stream: a late event does not
  delay the next ones), each stamped with the wall-clock time it was written.
- broker: the real one, ``gpubroker.runtime.run_broker`` in this process, with one ``generic``
  backend whose ``gpuPaths`` is ``POST /gpu`` (a GPU lease per request; the rest pass through),
  and the ``apiPort``: the "via apiPort" cases post the same body (model ``m``) to
  ``/v1/chat/completions`` there, a GPU path too, so the difference is the api port's own cost.
- load: ``wrk`` when installed (``apt-get install wrk``), else this script's own asyncio client
  (``--load``) in a child process; the SSE client is always this script's (``--sse``).

Prints a markdown table: req/s and p50/p99 latency for each case, direct and through the broker,
and the ratio; for SSE, events/s delivered and each event's latency from upstream write to
client read.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

SMALL = b"hello, world\n"
POST_BODY = b'{"model":"m","prompt":"hi","stream":false}'

NODE_UPSTREAM = r"""
const http = require("http");
const { performance } = require("perf_hooks");
const small = Buffer.from("hello, world\n");
const now = () => (performance.timeOrigin + performance.now()) / 1000;
const server = http.createServer((req, res) => {
  if (req.url.startsWith("/sse")) {
    const q = new URL(req.url, "http://x").searchParams;
    const n = +q.get("n"), interval = +q.get("interval");
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    // Event i is due at start + i * interval, however late the last one was: a GPU-bound
    // token stream does not slow down because the proxy's host is busy.
    const start = performance.now();
    let i = 0, timer;
    const tick = () => {
      if (i++ < n) {
        res.write(`data: {"token":"tok${i}","t":${now()}}\n\n`);
        timer = setTimeout(tick, Math.max(0, start + (i + 1) * interval - performance.now()));
      } else res.end("data: [DONE]\n\n");
    };
    timer = setTimeout(tick, interval);
    res.on("close", () => clearTimeout(timer));
    return;
  }
  req.on("data", () => {});
  req.on("end", () => {
    res.writeHead(200, { "content-type": "text/plain", "content-length": small.length });
    res.end(small);
  });
});
server.keepAliveTimeout = 65000;
server.listen(0, "127.0.0.1", () => console.log(server.address().port));
"""


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
            if target.startswith(b"/sse"):
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


# --- the old httpx client, for comparison only ----------------------------------------------


def httpx_upstream_class() -> type:
    """gpubroker's former upstream client (httpx), behind the same interface."""
    import httpx

    from gpubroker.errors import UpstreamError, UpstreamTimeout

    @dataclass(slots=True)
    class Response:
        status: int
        headers: list[tuple[bytes, bytes]]
        _response: httpx.Response

        async def body(self) -> AsyncIterator[bytes]:
            try:
                async for chunk in self._response.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                raise UpstreamError(str(exc)) from exc

        def buffered_body(self) -> bytes | None:
            return None

        async def aclose(self) -> None:
            await self._response.aclose()

    class HttpxUpstream:
        def __init__(self, base_url: str, *, response_timeout: float = 600.0) -> None:
            self.base_url = httpx.URL(base_url)
            self.response_timeout = response_timeout
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(connect=10.0, read=None, write=None, pool=None),
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
                trust_env=False,
            )
            for default in ("accept", "accept-encoding", "connection", "user-agent"):
                del self._client.headers[default]

        async def open(
            self,
            method: str,
            target: bytes,
            headers: list[tuple[bytes, bytes]],
            body: AsyncIterable[bytes] | None,
        ) -> Response:
            url = self.base_url.copy_with(raw_path=target)
            request = self._client.build_request(method, url, headers=headers, content=body)
            try:
                with anyio.fail_after(self.response_timeout):
                    response = await self._client.send(request, stream=True)
            except TimeoutError:
                raise UpstreamTimeout("timeout") from None
            except httpx.HTTPError as exc:
                raise UpstreamError(f"{self.base_url} unreachable: {exc}") from exc
            return Response(response.status_code, list(response.headers.raw), response)

        async def aclose(self) -> None:
            await self._client.aclose()

    return HttpxUpstream


def aiohttp_upstream_class() -> type:
    """aiohttp's client behind the same interface (install aiohttp to compare)."""
    import aiohttp
    from multidict import CIMultiDict
    from yarl import URL

    from gpubroker.errors import UpstreamError, UpstreamTimeout

    @dataclass(slots=True)
    class Response:
        status: int
        headers: list[tuple[bytes, bytes]]
        _response: aiohttp.ClientResponse

        async def body(self) -> AsyncIterator[bytes]:
            try:
                async for chunk in self._response.content.iter_any():
                    yield chunk
            except aiohttp.ClientError as exc:
                raise UpstreamError(str(exc)) from exc

        def buffered_body(self) -> bytes | None:
            return None

        async def aclose(self) -> None:
            self._response.release()

    class AiohttpUpstream:
        def __init__(self, base_url: str, *, response_timeout: float = 600.0) -> None:
            self.base_url = base_url
            self.timeout = aiohttp.ClientTimeout(sock_connect=10.0, total=None)
            self.response_timeout = response_timeout
            self._session: aiohttp.ClientSession | None = None

        async def open(
            self,
            method: str,
            target: bytes,
            headers: list[tuple[bytes, bytes]],
            body: AsyncIterable[bytes] | None,
        ) -> Response:
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=512),
                    auto_decompress=False,
                    skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                    timeout=self.timeout,
                )
            url = URL(self.base_url + target.decode("latin-1"), encoded=True)
            h = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers)
            try:
                with anyio.fail_after(self.response_timeout):
                    r = await self._session.request(
                        method, url, headers=h, data=body, allow_redirects=False
                    )
            except TimeoutError:
                raise UpstreamTimeout("timeout") from None
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"{self.base_url} unreachable: {exc}") from exc
            return Response(r.status, list(r.raw_headers), r)

        async def aclose(self) -> None:
            if self._session is not None:
                await self._session.close()

    return AiohttpUpstream


# --- the orchestra ----------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    method: str
    path: str
    connections: int
    port: str = "proxy"  # or "api": the broker's apiPort (direct: the upstream, same path)

    @property
    def label(self) -> str:
        return f"{self.name} c{self.connections}"


CASES = [
    Case("GET passthrough", "GET", "/small", 1),
    Case("GET passthrough", "GET", "/small", 16),
    Case("POST passthrough", "POST", "/small", 1),
    Case("POST passthrough", "POST", "/small", 16),
    Case("POST GPU lease", "POST", "/gpu", 1),
    Case("POST GPU lease", "POST", "/gpu", 16),
    Case("POST GPU lease via apiPort", "POST", "/v1/chat/completions", 1, "api"),
    Case("POST GPU lease via apiPort", "POST", "/v1/chat/completions", 16, "api"),
]


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.wrk = shutil.which("wrk") if not args.python_load else None
        self.cases = [c for c in CASES if re.search(args.only, c.label)]
        self.sse = bool(re.search(args.only, "SSE"))
        self.tmp = Path(tempfile.mkdtemp(prefix="gpubroker-bench-"))
        self.post_lua = self.tmp / "post.lua"
        self.post_lua.write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = '{POST_BODY.decode()}'\n"
        )

    async def child(self, *args: str) -> dict[str, Any]:
        cmd = [sys.executable, __file__, *args]
        result = await anyio.run_process(cmd, check=True)
        return json.loads(result.stdout)

    async def measure(self, base: str, case: Case, duration: int) -> dict[str, Any]:
        url = base + case.path
        if self.wrk is None:
            return await self.child(
                "--load", url, case.method, str(case.connections), str(duration)
            )
        cmd = [self.wrk, "-t1", f"-c{case.connections}", f"-d{duration}s", "--latency", url]
        if case.method == "POST":
            cmd[1:1] = ["-s", str(self.post_lua)]
        out = (await anyio.run_process(cmd, check=True)).stdout.decode()
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        socket_errors = re.search(r"Socket errors: (.*)", out)
        return {
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50": _wrk_ms(re.search(r"\s50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
            "p99": _wrk_ms(re.search(r"\s99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
            "errors": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else "",
        }

    async def run_cases(self, base: str, api: str | None = None) -> list[dict[str, Any]]:
        out = []
        for case in self.cases:
            url = api if case.port == "api" and api is not None else base
            await self.measure(url, case, 1)  # warm up: connections, pools, caches
            cpu = time.process_time()
            result = await self.measure(url, case, self.args.duration)
            cpu = time.process_time() - cpu  # this process's: the broker's, when there is one
            result["cpu_us"] = cpu / (result["rps"] * self.args.duration) * 1e6
            out.append(result)
        return out

    async def run_sse(self, base: str) -> dict[str, Any] | None:
        if not self.sse:
            return None
        a = self.args
        cpu = time.process_time()
        result = await self.child(
            "--sse", base + "/sse", str(a.streams), str(a.events), str(a.interval)
        )
        result["cpu_us"] = (time.process_time() - cpu) / result["events"] * 1e6
        return result


def _wrk_ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    assert m, value
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


async def start_upstream(python: bool) -> tuple[str, Any, str]:
    node = shutil.which("node")
    if node and not python:
        version = (await anyio.run_process([node, "--version"])).stdout.decode().strip()
        cmd, kind = [node, "-e", NODE_UPSTREAM], f"node {version}"
    else:
        cmd, kind = [sys.executable, __file__, "--upstream"], "python asyncio"
    proc = await anyio.open_process(cmd, stderr=None)
    assert proc.stdout is not None
    line = b""
    with anyio.fail_after(10):
        while not line.endswith(b"\n"):
            line += await proc.stdout.receive(1)
    return f"http://127.0.0.1:{int(line)}", proc, kind


async def with_broker(upstream: str, client: str, fn: Any) -> Any:
    """Run ``fn(proxy_url)`` against a real broker in front of ``upstream``."""
    from gpubroker import runtime
    from gpubroker.config.load import parse_config
    from gpubroker.plugins.manager import create_plugins

    original = runtime.Upstream
    if client == "httpx":
        runtime.Upstream = httpx_upstream_class()  # type: ignore[misc]
    elif client == "aiohttp":
        runtime.Upstream = aiohttp_upstream_class()  # type: ignore[misc]
    config = parse_config(
        {
            "backends": [
                {
                    "name": "bench",
                    "proxyPort": 18001,
                    "upstream": upstream,
                    "unloadStrategy": "generic",
                    "gpuPaths": ["POST /gpu", "POST /v1/chat/completions"],
                    "models": ["m"],
                }
            ],
            "apiPort": 18100,
        }
    )
    shutdown = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            endpoints = await tg.start(
                lambda task_status: runtime.run_broker(
                    config,
                    create_plugins(entry_points=False),
                    shutdown,
                    ephemeral_ports=True,
                    task_status=task_status,
                )
            )
            try:
                return await fn(endpoints.proxies["bench"], endpoints.api_url)
            finally:
                shutdown.set()
    finally:
        runtime.Upstream = original  # type: ignore[misc]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report(
    cases: list[Case],
    direct: list[dict[str, Any]],
    brokers: dict[str, list[dict[str, Any]]],
    sse_direct: dict[str, Any] | None,
    sse_broker: dict[str, Any],
) -> str:
    rows = [
        "| case | conns | client | req/s | p50 ms | p99 ms | req/s ratio | added p50 ms "
        "| broker CPU µs/req |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, case in enumerate(cases):
        d = direct[i]
        rows.append(
            f"| {case.name} | {case.connections} | direct | {d['rps']:,.0f} | {d['p50']:.3f} "
            f"| {d['p99']:.3f} | | | |"
        )
        for client, results in brokers.items():
            b = results[i]
            err = f" ({b['errors']} errors)" if b["errors"] else ""
            rows.append(
                f"| | | broker ({client}) | {b['rps']:,.0f}{err} | {b['p50']:.3f} "
                f"| {b['p99']:.3f} | {_ratio(b['rps'], d['rps'])} | {b['p50'] - d['p50']:+.3f} "
                f"| {b['cpu_us']:.0f} |"
            )
    rows += _api_cost(cases, brokers)
    if sse_direct is None:
        return "\n".join(rows)
    rows += [
        "",
        "| SSE | events/s | delivered | first event p50/max ms | event latency p50 ms | p99 ms "
        "| events/s ratio | added p50 ms | added p99 ms | broker CPU µs/event |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| direct | {sse_direct['eps']:,.0f} | {sse_direct['events']}/{sse_direct['expected']} "
        f"| {sse_direct['first_p50']:.1f} / {sse_direct['first_max']:.0f} "
        f"| {sse_direct['p50']:.2f} | {sse_direct['p99']:.2f} | | | | |",
    ]
    for client, s in sse_broker.items():
        rows.append(
            f"| broker ({client}) | {s['eps']:,.0f} | {s['events']}/{s['expected']} "
            f"| {s['first_p50']:.1f} / {s['first_max']:.0f} | {s['p50']:.2f} | {s['p99']:.2f} "
            f"| {s['eps'] / sse_direct['eps']:.3f}x "
            f"| {s['p50'] - sse_direct['p50']:+.2f} | {s['p99'] - sse_direct['p99']:+.2f} "
            f"| {s['cpu_us']:.0f} |"
        )
    return "\n".join(rows)


def _api_cost(cases: list[Case], brokers: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The api port's own broker CPU: each via-apiPort case against the same lease case
    through the proxy port (target: at most +100 µs/req)."""
    out = []
    for i, case in enumerate(cases):
        if case.port != "api":
            continue
        conns = case.connections
        same = [j for j, c in enumerate(cases) if c.path == "/gpu" and c.connections == conns]
        if not same:
            continue
        twin = same[0]
        for client, results in brokers.items():
            api, proxy = results[i]["cpu_us"], results[twin]["cpu_us"]
            out.append(
                f"apiPort vs proxyPort, GPU lease c{case.connections} ({client}): "
                f"{api:.0f} vs {proxy:.0f} broker CPU µs/req ({api - proxy:+.0f} µs)"
            )
    return ["", *out] if out else []


async def orchestrate(args: argparse.Namespace) -> None:
    runner = Runner(args)
    clients = ["lean", *args.compare]
    upstream, proc, kind = await start_upstream(args.python_upstream)
    try:
        print(
            f"upstream: {kind}; load: {'wrk' if runner.wrk else 'python asyncio'}; "
            f"{os.cpu_count()} CPUs; {args.duration:g}s per case",
            file=sys.stderr,
        )
        direct = await runner.run_cases(upstream)
        sse_direct = await runner.run_sse(upstream)
        brokers: dict[str, list[dict[str, Any]]] = {}
        sse_broker: dict[str, Any] = {}
        for client in clients:

            async def run(proxy: str, api: str) -> None:
                brokers[client] = await runner.run_cases(proxy, api)  # noqa: B023
                sse_broker[client] = await runner.run_sse(proxy)  # noqa: B023

            started = time.perf_counter()
            await with_broker(upstream, client, run)
            print(f"{client}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
    finally:
        proc.terminate()
        await proc.wait()
        await proc.aclose()
    print(report(runner.cases, direct, brokers, sse_direct, sse_broker))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--duration", type=int, default=3, help="seconds per case")
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--events", type=int, default=200, help="events per SSE stream")
    p.add_argument("--interval", type=int, default=20, help="ms between SSE events")
    p.add_argument(
        "--compare", nargs="*", default=[], choices=["httpx", "aiohttp"], help="other clients"
    )
    p.add_argument(
        "--only", default="", metavar="REGEX", help='cases to run, e.g. "GPU", "c16|SSE"'
    )
    p.add_argument("--python-upstream", action="store_true", help="even if node is installed")
    p.add_argument("--python-load", action="store_true", help="even if wrk is installed")
    p.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--sse", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if "aiohttp" in args.compare and importlib.util.find_spec("aiohttp") is None:
        p.error("--compare aiohttp needs aiohttp (pip install aiohttp)")
    if args.upstream:
        asyncio.run(python_upstream())
    elif args.load:
        url, method, conns, duration = args.load
        print(json.dumps(asyncio.run(load(url, method, int(conns), float(duration)))))
    elif args.sse:
        url, streams, events, interval = args.sse
        print(json.dumps(asyncio.run(sse(url, int(streams), int(events), int(interval)))))
    else:
        logging.basicConfig(level=logging.WARNING)
        anyio.run(orchestrate, args)


if __name__ == "__main__":
    main()
