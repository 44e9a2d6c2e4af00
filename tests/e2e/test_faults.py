"""Fault and abuse runs: seeded random sequences against a broker in front of two emulators.

Each run mixes ordinary GPU requests with the faults a real fleet and a hostile client produce:
clients that leave mid-stream or while queued, upstreams that crash mid-stream, heads that
hang past ``upstreamTimeout``, unloads that hang past ``unloadTimeout``, and smuggling
attempts (Content-Length with chunked framing). The two services never fit on the simulated
GPU together, so a lease given out wrongly is an OOM. After every run: 0 OOMs, no unload that
cut a stream, no lease left, the queue empty, the broker's file descriptors back to where they
were, and every request answered or cleanly aborted.

Reproduce a failure from its seed: ``GPUBROKER_FAULT_SEED=<seed> pytest tests/test_faults.py``.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import httpx
import pytest

from gpubroker.runtime import Endpoints
from gpubroker.sim import GenericEmulator, GiB, SimGPU, gpu_app, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

SEEDS = (
    [int(os.environ["GPUBROKER_FAULT_SEED"])]
    if "GPUBROKER_FAULT_SEED" in os.environ
    else [
        11,
        23,
        47,
    ]
)
OPERATIONS = 36
CONCURRENCY = 6
RUN_LIMIT = 90.0  # seconds for one whole run, settling included


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").exists() else 0


class Run:
    """One seeded run: the operations, and what each one saw."""

    def __init__(
        self, seed: int, ep: Endpoints, client: httpx.AsyncClient, emus: list[GenericEmulator]
    ) -> None:
        self.rng = random.Random(seed)
        self.ep = ep
        self.client = client
        self.emus = emus
        self.outcomes: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def url(self, backend: str) -> str:
        return self.ep.proxies[backend] + "/generate"

    def backend(self) -> str:
        return self.rng.choice(["a", "b"])

    def expect(self, what: str, status: int, allowed: set[int]) -> None:
        self.outcomes[f"{what}:{status}"] += 1
        if status not in allowed:
            self.unexpected.append(f"{what} answered {status}, expected one of {sorted(allowed)}")

    # --- operations: each ends by itself, answered or cleanly aborted -------------------------

    async def plain(self) -> None:
        r = await self.client.post(self.url(self.backend()), json={"tokens": 4})
        self.expect("plain", r.status_code, {200, 503})  # 503: waited past queueTimeout

    async def leave_mid_stream(self) -> None:
        async with self.client.stream("POST", self.url(self.backend()), json={"tokens": 30}) as r:
            async for _ in r.aiter_bytes():
                break  # one chunk, then the client goes
        self.expect("leave_mid_stream", r.status_code, {200, 503})

    async def leave_while_queued(self) -> None:
        with anyio.move_on_after(self.rng.uniform(0.02, 0.3)):
            r = await self.client.post(self.url(self.backend()), json={"tokens": 6})
            self.expect("leave_while_queued", r.status_code, {200, 503})
            return
        self.outcomes["leave_while_queued:left"] += 1

    async def crash_mid_stream(self) -> None:
        body = {"tokens": 10, "crash_after": self.rng.randint(0, 3), "format": "ndjson"}
        try:
            async with self.client.stream("POST", self.url(self.backend()), json=body) as r:
                text = b"".join([chunk async for chunk in r.aiter_bytes()])
        except httpx.RemoteProtocolError:  # aborted, as the upstream aborted: also clean
            self.outcomes["crash_mid_stream:aborted"] += 1
            return
        self.expect("crash_mid_stream", r.status_code, {200, 503})
        if r.status_code == 200 and b'"done": true' in text.replace(
            b'"done":true', b'"done": true'
        ):
            self.unexpected.append("a crashed stream reached the client as complete")

    async def hung_head(self) -> None:
        r = await self.client.post(self.url(self.backend()), json={"delay": 5})
        self.expect("hung_head", r.status_code, {504, 503})

    async def hung_unload(self) -> None:
        victim = self.rng.choice(self.emus)
        victim.unload_hang = True
        await anyio.sleep(self.rng.uniform(0.2, 0.8))
        victim.unload_hang = False
        self.outcomes["hung_unload"] += 1

    async def smuggle(self) -> None:
        """A passthrough GET whose body, read by Content-Length, hides a GPU request."""
        backend = self.backend()
        port = int(self.ep.proxies[backend].rsplit(":", 1)[1])
        hidden = (
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        chunked = b"0\r\n\r\n" + hidden
        request = (
            b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(chunked), chunked)
        )
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as sock:
                await sock.send(request)
                reply = b""
                with anyio.move_on_after(3):
                    while True:
                        try:
                            reply += await sock.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError):
                            break
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
        self.expect("smuggle", status, {400})
        if reply.count(b"HTTP/1.1 ") > 1:
            self.unexpected.append("a smuggled request got an answer of its own")

    def pick(self) -> Callable[[], Awaitable[None]]:
        ops: list[tuple[Callable[[], Awaitable[None]], int]] = [
            (self.plain, 5),
            (self.leave_mid_stream, 2),
            (self.leave_while_queued, 2),
            (self.crash_mid_stream, 2),
            (self.hung_head, 1),
            (self.hung_unload, 1),
            (self.smuggle, 1),
        ]
        return self.rng.choices([op for op, _ in ops], weights=[w for _, w in ops])[0]

    async def go(self) -> None:
        limiter = anyio.CapacityLimiter(CONCURRENCY)

        async def one(op: Callable[[], Awaitable[None]]) -> None:
            async with limiter:
                try:
                    await op()
                except Exception as exc:  # any other failure is a request not answered
                    self.unexpected.append(f"{op.__name__}: {type(exc).__name__}: {exc}")

        async with anyio.create_task_group() as tg:
            for _ in range(OPERATIONS):
                tg.start_soon(one, self.pick())
                await anyio.sleep(self.rng.uniform(0, 0.05))


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_random_mix_of_faults_leaves_nothing_behind(seed: int) -> None:
    gpu = SimGPU(8 * GiB)  # 5 + 5 GiB never fit: a lease given out wrongly is an OOM
    a = GenericEmulator(gpu, 5 * GiB, owner="a", token_interval=0.01)
    b = GenericEmulator(gpu, 5 * GiB, owner="b", token_interval=0.01)
    spec = {"unloadStrategy": "generic", "unloadEndpoint": "/unload"}
    baseline = open_fds()
    # Telemetry as in production (NVML there, the simulated GPU here): a victim whose unload
    # hung still holds its memory, so nothing may be loaded over it.
    async with running(a.app) as ua, running(b.app) as ub, running(gpu_app(gpu)) as g:
        cfg = make_config(
            {"a": {"upstream": ua, **spec}, "b": {"upstream": ub, **spec}},
            telemetry="sim",
            telemetryUrl=g,
            telemetryInterval="100ms",
            queueTimeout="2s",
            unloadTimeout="500ms",
            upstreamTimeout="1s",
            holdTime="200ms",
        )
        with anyio.fail_after(RUN_LIMIT):
            async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=15) as client:
                run = Run(seed, ep, client, [a, b])
                await run.go()
                a.unload_hang = b.unload_hang = False
                with anyio.move_on_after(15):  # leases end, the queue drains
                    while True:
                        s = (await client.get(ep.status_url + "/")).json()
                        if not s["totals"]["inFlight"] and not s["queueLength"]:
                            break
                        await anyio.sleep(0.05)
    after = open_fds()
    where = f"seed {seed} (GPUBROKER_FAULT_SEED={seed}); outcomes {dict(run.outcomes)}"
    assert not run.unexpected, f"{where}: {run.unexpected}"
    assert gpu.oom_count == 0, where
    assert a.unload_with_inflight == b.unload_with_inflight == 0, where
    assert s["totals"]["inFlight"] == 0 and s["queueLength"] == 0, f"{where}: {s['liveRequests']}"
    assert after <= baseline + 2, f"{where}: {after - baseline} file descriptors left open"
