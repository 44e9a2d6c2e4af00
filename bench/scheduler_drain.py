"""10,000 GPU requests at once through a real broker: all answered, and what queuing them cost.

    .venv/bin/python bench/scheduler_drain.py                    # 10,000 concurrent requests
    .venv/bin/python bench/scheduler_drain.py --requests 2000

Three backends under ``policy: exclusive`` on one simulated GPU (``GenericEmulator``s, each
answering a non-streaming ``POST /generate`` in ~1 ms, ``maxConcurrency`` 32 each, ``holdTime``
1 s), behind a real broker in a child process (its sockets are its own: 10,000 connections
each side would pass this machine's 20,000 open files in one process). A first request holds
the GPU for ``c`` for ``--block`` seconds; meanwhile every client connects (at most 256
connects at a time, raw asyncio streams: an HTTP/1.1 ``POST`` with ``Connection: close``),
alternating ``a`` and ``b``, and waits; then the queue drains through swaps.

Printed: how many were answered and how (every one should be a 200), the time from the first
connect to the last answer, the deepest queue the scheduler held, its swaps, and the event-loop
time the broker spent inside the scheduler's methods (every outermost call, wall time in the
child, garbage collections that fall inside included), in all, per call and per method.
``DRAIN_PROFILE=FILE`` runs the child under cProfile.

Run it against the scheduler before issue 16 by pointing ``PYTHONPATH`` at an older tree: the
child imports whatever ``gpubroker`` the parent does, and uses only public names.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

import anyio
from anyio.abc import ByteStream
from replay_report import git_rev  # (bench/ is on the path, as these run)

from gpubroker.sim import GenericEmulator, GiB, SimGPU, running

TIMED = (
    "request",
    "released",
    "cancel",
    "tick",
    "next_deadline",
    "idle",
    "unloaded",
    "loaded",
    "jobs",
    "measured",
    "unmanaged",
    "observed",
    "refuse_all",
)
BODY = json.dumps({"tokens": 1, "stream": False}).encode()


# --- the broker's side (the child process) ----------------------------------------------------


@dataclass
class SchedulerClock:
    """Time spent in the scheduler's methods, outermost calls only (one calls another)."""

    seconds: float = 0.0
    calls: int = 0
    max_queued: int = 0
    depth: int = 0
    by_method: dict[str, list[float]] = field(default_factory=dict)  # name -> [calls, seconds]
    gc_seconds: float = 0.0  # collections that ran inside those calls (the whole heap's)
    _gc_started: float = 0.0

    def wrap(self, sched: Any) -> None:
        for name in TIMED:
            setattr(sched, name, self._timed(sched, getattr(sched, name)))
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, _info: dict[str, int]) -> None:
        if not self.depth:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_seconds += time.perf_counter() - self._gc_started

    def _timed(self, sched: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                self.seconds += took
                self.calls += 1
                self.depth -= 1
                self.max_queued = max(self.max_queued, sched.queued())
                mine = self.by_method.setdefault(fn.__name__, [0, 0.0])
                mine[0] += 1
                mine[1] += took

        return timed


async def serve(upstreams: dict[str, str]) -> None:
    """Run the broker until stdin closes; print its ports first, its scheduler's cost last."""
    from gpubroker.testing import broker_running, make_config

    backend = {"unloadStrategy": "generic", "unloadEndpoint": "/unload", "maxConcurrency": 32}
    cfg = make_config(
        {name: {"upstream": url, **backend} for name, url in upstreams.items()},
        holdTime="1s",
        queueTimeout="10m",
    )
    clock = SchedulerClock()
    async with broker_running(cfg) as ep:
        assert ep.broker is not None
        clock.wrap(ep.broker.sched)
        print(json.dumps({"proxies": ep.proxies}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the parent is done
        sched = ep.broker.sched
        stats = {
            "seconds": clock.seconds,
            "gc_seconds": clock.gc_seconds,
            "calls": clock.calls,
            "max_queued": clock.max_queued,
            "swaps": sched.swap_count,
            "queued_at_end": sched.queued(),
            "by_method": clock.by_method,
        }
    print(json.dumps(stats), flush=True)


# --- the clients' side ----------------------------------------------------------------------


@dataclass
class Outcome:
    status: dict[str, int] = field(default_factory=dict)  # "200", "503", "error: ..." -> count
    latencies: list[float] = field(default_factory=list)

    def add(self, key: str) -> None:
        self.status[key] = self.status.get(key, 0) + 1


async def post(host: str, port: int, body: bytes, connects: anyio.Semaphore) -> str:
    """One ``POST /generate``; its status code, or what went wrong."""
    head = (
        f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        async with connects:
            stream: ByteStream = await anyio.connect_tcp(host, port)
        async with stream:
            await stream.send(head + body)
            data = b""
            while True:
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    except OSError as exc:
        return f"error: {type(exc).__name__}"
    parts = data.split(b" ", 2)
    return parts[1].decode() if len(parts) > 1 else "error: no answer"


def hostport(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port)


async def drive(requests: int, block: float) -> dict[str, Any]:
    gpu = SimGPU(8 * GiB)
    emus = {n: GenericEmulator(gpu, 5 * GiB, owner=n, token_interval=0.001) for n in "abc"}
    async with AsyncExitStack() as stack:
        urls = {n: await stack.enter_async_context(running(e.app)) for n, e in emus.items()}
        child = await anyio.open_process(
            [sys.executable, __file__, "--serve", json.dumps(urls)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=os.environ.copy(),
        )
        assert child.stdout is not None and child.stdin is not None
        lines = LineReader(child.stdout)
        proxies = json.loads(await lines.next())["proxies"]
        targets = {n: hostport(u) for n, u in proxies.items()}
        outcome = Outcome()
        connects = anyio.Semaphore(256)

        async def one(name: str, body: bytes) -> None:
            t0 = time.perf_counter()
            key = await post(*targets[name], body, connects)
            outcome.latencies.append(time.perf_counter() - t0)
            outcome.add(key)

        blocker = json.dumps({"tokens": max(1, int(block / 0.001)), "stream": False}).encode()
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "c", blocker)  # holds the GPU while the others connect and queue
            await anyio.sleep(0.1)
            for i in range(requests):
                tg.start_soon(one, "ab"[i % 2], BODY)
        elapsed = time.perf_counter() - started
        await child.stdin.aclose()
        stats = json.loads(await lines.next())
        await child.wait()
    return {
        "requests": requests,
        "status": outcome.status,
        "elapsed_s": elapsed,
        "p50_s": statistics.median(outcome.latencies),
        "max_s": max(outcome.latencies),
        "ooms": gpu.oom_count,
        **{f"sched_{k}": v for k, v in stats.items()},
    }


class LineReader:
    """Lines from a child's stdout."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.buf = b""

    async def next(self) -> str:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive()
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()


def raise_open_files(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, need))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < need:
        sys.exit(f"{need} open files needed, the limit is {soft} (ulimit -n)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--block", type=float, default=5.0, help="seconds the first request holds a")
    ap.add_argument("--serve", help=argparse.SUPPRESS)  # the child: upstreams as JSON
    args = ap.parse_args(argv)
    raise_open_files(args.requests + 512)
    if args.serve:
        if os.environ.get("DRAIN_PROFILE"):
            import cProfile

            cProfile.runctx(
                "anyio.run(serve, json.loads(args.serve))",
                globals(),
                locals(),
                os.environ["DRAIN_PROFILE"],
            )
        else:
            anyio.run(serve, json.loads(args.serve))
        return 0
    print(f"bench/scheduler_drain.py  git {git_rev()}  {args.requests:,} concurrent requests")
    r = anyio.run(drive, args.requests, args.block)
    ok = r["status"].get("200", 0)
    per_call = r["sched_seconds"] / max(r["sched_calls"], 1) * 1e6
    print(f"answered {sum(r['status'].values()):,} of {r['requests'] + 1:,}: {r['status']}")
    print(f"first connect to last answer {r['elapsed_s']:.1f} s (p50 {r['p50_s']:.1f} s)")
    print(
        f"deepest queue {r['sched_max_queued']:,}, swaps {r['sched_swaps']}, OOMs {r['ooms']}, "
        f"left queued {r['sched_queued_at_end']}"
    )
    print(
        f"event loop inside the scheduler: {r['sched_seconds']:.2f} s over "
        f"{r['sched_calls']:,} calls ({per_call:.1f} µs per call), of which garbage "
        f"collections of the whole heap that fell inside them {r['sched_gc_seconds']:.2f} s"
    )
    busiest = sorted(r["sched_by_method"].items(), key=lambda kv: -kv[1][1])
    print(
        "  by method: "
        + ", ".join(f"{k} {n:,.0f} calls {t * 1e6 / n:.0f} µs" for k, (n, t) in busiest[:6])
    )
    return 0 if ok == r["requests"] + 1 and r["ooms"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
