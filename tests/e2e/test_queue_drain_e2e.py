"""A burst of 2,000 GPU requests waits in a real broker's queue at once and every one is
served: real sockets, emulated services (issue 16; ``bench/scheduler_drain.py`` runs 10,000)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from gpubroker.sim import GenericEmulator, GiB, SimGPU, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

BURST = 2_000
BODY = b'{"tokens": 1, "stream": false}'


def gated(app: Any, gate: anyio.Event) -> Any:
    """``app`` whose ``POST /generate`` waits for ``gate``: a request that holds the GPU for
    as long as the test wants."""

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/generate":
            await gate.wait()
        await app(scope, receive, send)

    return asgi


async def post(url: str, connects: anyio.Semaphore) -> int:
    """One ``POST /generate`` over a connection of its own; the status code."""
    host, _, port = url.removeprefix("http://").partition(":")
    head = (
        f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
    ).encode()
    async with connects:
        stream = await anyio.connect_tcp(host, int(port))
    async with stream:
        await stream.send(head + BODY)
        data = b""
        while True:
            try:
                data += await stream.receive()
            except anyio.EndOfStream:
                break
    return int(data.split(b" ", 2)[1])


@pytest.fixture
def open_files() -> None:
    """Two sockets per request in this process (client and broker): raise the soft limit."""
    need = 2 * BURST + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need and (hard == resource.RLIM_INFINITY or hard >= need):
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    elif soft < need:
        pytest.skip(f"{need} open files needed; the hard limit is {hard}")


@pytest.mark.usefixtures("open_files")
async def test_a_burst_of_two_thousand_waiting_requests_is_served_in_full() -> None:
    gpu = SimGPU(8 * GiB)
    emus = {n: GenericEmulator(gpu, 5 * GiB, owner=n, token_interval=0.001) for n in "abc"}
    gate = anyio.Event()
    async with (
        running(emus["a"].app) as ua,
        running(emus["b"].app) as ub,
        running(gated(emus["c"].app, gate)) as uc,
    ):
        backend = {"unloadStrategy": "generic", "unloadEndpoint": "/unload", "maxConcurrency": 16}
        cfg = make_config(
            {n: {"upstream": u, **backend} for n, u in (("a", ua), ("b", ub), ("c", uc))},
            holdTime="500ms",
        )
        async with broker_running(cfg) as ep:
            assert ep.broker is not None
            sched = ep.broker.sched
            codes: list[int] = []
            connects = anyio.Semaphore(128)

            async def one(name: str) -> None:
                codes.append(await post(ep.proxies[name], connects))

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one, "c")  # holds the GPU until the gate opens
                    while not sched.in_flight("c"):
                        await anyio.sleep(0.01)
                    for i in range(BURST):
                        tg.start_soon(one, "ab"[i % 2])
                    while sched.queued() < BURST:  # every one of them waits at once
                        await anyio.sleep(0.05)
                    gate.set()
            assert sched.queued() == 0 and not sched.plans
    assert codes.count(200) == BURST + 1, {c: codes.count(c) for c in set(codes)}
    assert gpu.oom_count == 0
    assert all(e.unload_with_inflight == 0 for e in emus.values())


def test_the_ten_thousand_bench_still_runs_on_a_hundred() -> None:
    bench = Path(__file__).resolve().parents[2] / "bench" / "scheduler_drain.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, str(bench), "--requests", "100", "--block", "0.5"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "answered 101 of 101: {'200': 101}" in done.stdout
