"""A managed worker that crashed and waits for its restart is not served to: a request in that
window waits for the restart and succeeds, or, once the worker is marked failed, gets a 503
``worker_failed`` with Retry-After; never a 502 from the dead port."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gpubroker.testing import broker_running, make_config
from gpubroker.workers import supervisor as supervisor_module
from gpubroker.workers.parts import Backoff
from gpubroker.workers.supervisor import Supervisor
from gpubroker.workers.worker import WorkerState
from processes import free_port

pytestmark = pytest.mark.anyio

# Restarts a second apart: a window wide enough to send a request into.
SLOW = Backoff(first=1.0, factor=1.0, limit=1.0, max_crashes=3, window=60.0)


@pytest.fixture(autouse=True)
def slow_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "Backoff", lambda: SLOW)


def flagged(flag: Path) -> dict[str, Any]:
    """A worker that, once ``flag`` exists, exits at start-up (every restart fails)."""
    script = (
        f'test -e "{flag}" && {{ echo "cannot load"; exit 3; }}; '
        f"exec {sys.executable} -m gpubroker.sim.fake_worker --port {{port}}"
    )
    return {
        "upstream": f"http://127.0.0.1:{free_port()}",
        "unloadStrategy": "process",
        "command": ["sh", "-c", script],
        "healthPath": "/v1/models",
        "startTimeout": "10s",
        "stopTimeout": "2s",
    }


async def chat(client: httpx.AsyncClient, base: str) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    return await client.post(base + "/v1/chat/completions", json=body)


async def crash(sup: Supervisor) -> None:
    """SIGKILL the worker and wait until the supervisor holds it for its restart."""
    w = sup.workers["w"]
    assert w.pid is not None and w.state is WorkerState.READY
    os.kill(w.pid, signal.SIGKILL)
    with anyio.fail_after(10):
        while not sup.recovering("w"):
            await anyio.sleep(0.01)


async def test_a_request_during_the_restart_backoff_waits_and_succeeds(tmp_path: Path) -> None:
    cfg = make_config({"w": flagged(tmp_path / "flag")})
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=30) as client:
        assert (await chat(client, ep.proxies["w"])).status_code == 200  # starts it
        sup = ep.broker.supervisor if ep.broker else None
        assert sup is not None
        first = sup.workers["w"].pid
        await crash(sup)
        r = await chat(client, ep.proxies["w"])  # sent while it waits for its restart
        assert r.status_code == 200, r.text
        w = sup.workers["w"]
        assert w.restarts == 1 and w.pid not in (None, first)
        status = (await client.get(ep.status_url + "/")).json()
    assert status["backends"]["w"]["upstreamErrors"] == 0


async def test_once_the_restart_fails_waiting_requests_get_503_with_retry_after(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "flag"
    cfg = make_config({"w": flagged(flag)})
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=30) as client:
        assert (await chat(client, ep.proxies["w"])).status_code == 200
        sup = ep.broker.supervisor if ep.broker else None
        assert sup is not None
        flag.touch()  # from now on every start fails: a crash loop
        await crash(sup)
        results: list[httpx.Response] = []

        async def one() -> None:
            results.append(await chat(client, ep.proxies["w"]))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
        assert sup.workers["w"].state is WorkerState.FAILED
        status = (await client.get(ep.status_url + "/")).json()
    assert [r.status_code for r in results] == [503] * 3
    for r in results:
        body = r.json()
        assert body["error"] == "worker_failed" and body["retryable"] is True
        assert "crash loop" in body["message"] and "\n" not in body["message"]
        assert int(r.headers["retry-after"]) >= 1
    assert status["backends"]["w"]["upstreamErrors"] == 0  # no request met the dead port


async def test_a_client_leaving_during_the_restart_wait_ends_its_lease_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for a restart is a wait like the queue's: a client that walks away ends its
    lease at once, not when the worker is back (its slot and the GPU held for nobody)."""
    monkeypatch.setattr(
        supervisor_module,
        "Backoff",
        lambda: Backoff(first=30.0, factor=1.0, limit=30.0, max_crashes=3, window=60.0),
    )
    cfg = make_config({"w": flagged(tmp_path / "flag")})
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=30) as client:
        assert (await chat(client, ep.proxies["w"])).status_code == 200  # starts it
        sup = ep.broker.supervisor if ep.broker else None
        assert sup is not None
        await crash(sup)  # its restart is 30 s away
        host, port = ep.proxies["w"].removeprefix("http://").rsplit(":", 1)
        body = b'{"model": "m", "messages": [], "stream": true}'
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
        with anyio.fail_after(10):
            async with await anyio.connect_tcp(host, int(port)) as stream:
                await stream.send(head + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
                while not (await client.get(ep.status_url + "/")).json()["totals"]["inFlight"]:
                    await anyio.sleep(0.02)
            # the client is gone: its lease ends now, 30 s before the restart
            while (await client.get(ep.status_url + "/")).json()["totals"]["inFlight"]:
                await anyio.sleep(0.05)
        assert sup.recovering("w")  # still waiting for the restart: the lease did not wait
