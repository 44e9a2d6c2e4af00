"""Managed workers behind a real broker: the process strategy, faults clients see, the
``gpubroker workers`` commands (and their bad input), and ``gpubroker serve`` leaving no orphan.

Workers are the fake worker (``gpubroker.sim.fake_worker``) as real processes on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from typer.testing import CliRunner

from gpubroker.cli.main import app
from gpubroker.events import on_wire
from gpubroker.plugins.manager import Provided, create_plugins
from gpubroker.telemetry.base import (
    GpuProcess,
    GpuSample,
    TelemetrySnapshot,
    TelemetrySource,
)
from gpubroker.testing import broker_running, make_config
from gpubroker.workers.parts import Backoff
from gpubroker.workers.procs import MARKER, MARKER_UPSTREAM
from gpubroker.workers.supervisor import Supervisor
from gpubroker.workers.worker import WorkerState
from processes import FAKE, alive, all_gone, free_port, popen, port_open

pytestmark = pytest.mark.anyio
runner = CliRunner()


def managed(*args: str, port: int | None = None, **keys: Any) -> dict[str, Any]:
    return {
        "upstream": f"http://127.0.0.1:{port or free_port()}",
        "unloadStrategy": "process",
        "command": [*FAKE, *args],
        "healthPath": "/v1/models",
        "startTimeout": "10s",
        "stopTimeout": "2s",
        **keys,
    }


def supervisor(ep: Any) -> Supervisor:
    sup = ep.broker.supervisor
    assert sup is not None
    return sup


async def cli(*args: str) -> Any:
    return await anyio.to_thread.run_sync(lambda: runner.invoke(app, list(args)))


def one_line_error(result: Any, code: int) -> str:
    assert result.exit_code == code, result.output
    err: str = result.stderr
    assert err.startswith("gpubroker: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in result.output
    return err.removeprefix("gpubroker: error: ").strip()


async def chat(client: httpx.AsyncClient, base: str, *, stream: bool = True) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return await client.post(base + "/v1/chat/completions", json=body)


def sse_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("data: ")]


# --- the process strategy through the scheduler ----------------------------------------------


async def test_requests_start_stop_and_restart_workers_through_the_scheduler() -> None:
    cfg = make_config({"a": managed(), "b": managed()})
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
        sup = supervisor(ep)
        a, b = sup.workers["a"], sup.workers["b"]
        assert a.state is WorkerState.STOPPED and b.state is WorkerState.STOPPED
        status = (await client.get(ep.status_url + "/")).json()
        assert status["backends"]["a"]["state"] == "absent"  # reconciled from the supervisor

        r = await chat(client, ep.proxies["a"])  # the first request starts a
        assert r.status_code == 200
        lines = sse_lines(r.text)
        assert lines[-1] == "data: [DONE]" and len(lines) == 11
        first_a = a.pid
        assert a.state is WorkerState.READY and first_a is not None

        r = await chat(client, ep.proxies["b"], stream=False)  # a is stopped to make room
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        assert "evicted=a" in r.headers["x-gpubroker-swap"]
        assert a.state is WorkerState.STOPPED and a.pid is None
        assert await all_gone([first_a])
        assert not port_open(a.port)

        r = await chat(client, ep.proxies["a"])  # and started again on demand
        assert r.status_code == 200 and sse_lines(r.text)[-1] == "data: [DONE]"
        assert a.pid not in (None, first_a) and b.state is WorkerState.STOPPED
        pids = [p for p in (a.pid, b.pid) if p]
    assert await all_gone(pids)  # the broker's shutdown stopped them


async def test_a_request_for_a_stopped_worker_queues_until_it_is_healthy() -> None:
    cfg = make_config({"slow": managed("--start-delay", "0.5")})
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
        started = time.monotonic()
        results = []

        async def one() -> None:
            results.append(await chat(client, ep.proxies["slow"], stream=False))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert time.monotonic() - started >= 0.5
        assert max(int(r.headers["x-gpubroker-queue-ms"]) for r in results) >= 400
        log = "\n".join(supervisor(ep).workers["slow"].log.tail(100))
        assert log.count("listening on") == 1  # one process for all three


async def test_a_worker_that_cannot_start_fails_its_queued_requests_with_502() -> None:
    cfg = make_config({"bad": managed("--crash-after", "0")})
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
        r = await chat(client, ep.proxies["bad"])
        assert r.status_code == 502
        assert r.json()["error"] == "load_failed"
        assert "exited with code 3 before it was ready" in r.json()["message"]
        assert "\n" not in r.json()["message"]  # its output is for admins, not clients
        listed = (await client.get(ep.status_url + "/api/workers")).json()["workers"]
        assert listed[0]["state"] == "failed"
        assert "fatal: cannot load model (--crash-after 0)" in listed[0]["logTail"]
        shown = await cli("workers", "start", "bad", "--url", ep.status_url)
        assert shown.exit_code == 1
        assert "  | fatal: cannot load model (--crash-after 0)" in shown.stdout
        table = (await cli("workers", "list", "--url", ep.status_url)).stdout
        assert "bad             failed" in table and "  error: exited with code 3" in table
        assert "  | fatal: cannot load model (--crash-after 0)" in table


# --- crashes clients see ---------------------------------------------------------------------


async def test_crash_mid_stream_ends_cleanly_and_the_worker_comes_back() -> None:
    cfg = make_config({"w": managed("--crash-after", "1", "--tokens", "10")})
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
        sup = supervisor(ep)
        r = await chat(client, ep.proxies["w"])  # crashes halfway through its answer
        assert r.status_code == 200
        lines = sse_lines(r.text)
        assert '"upstream_error"' in lines[-2] and lines[-1] == "data: [DONE]"
        assert len([x for x in lines if '"content"' in x]) == 5
        w = sup.workers["w"]
        with anyio.fail_after(10):
            while w.state is not WorkerState.READY or w.restarts < 1:
                await anyio.sleep(0.05)
        r = await chat(client, ep.proxies["w"])  # a new process: its first request crashes too
        assert r.status_code == 200 and "[DONE]" in r.text
        with anyio.fail_after(10):
            while w.state is not WorkerState.READY or w.restarts < 2:
                await anyio.sleep(0.05)
        r = await chat(client, ep.proxies["w"], stream=False)  # crash before the first byte
        assert r.status_code == 502 and r.json()["error"] == "upstream_unreachable"
        status = (await client.get(ep.status_url + "/")).json()
        assert status["totals"]["inFlight"] == 0


async def test_sigterm_to_a_worker_mid_stream_is_a_clean_end_for_the_client() -> None:
    cfg = make_config({"w": managed("--tokens", "200", "--token-interval", "0.02")})
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
        sup = supervisor(ep)
        lines: list[str] = []
        body = {"messages": [], "stream": True}
        async with client.stream("POST", ep.proxies["w"] + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                if len(lines) == 5:
                    os.kill(sup.workers["w"].pid, signal.SIGTERM)  # type: ignore[arg-type]
        assert lines[-1] == "data: [DONE]" and '"upstream_error"' in lines[-2]
        assert len(lines) < 100
        w = sup.workers["w"]
        first = w.last_exit
        with anyio.fail_after(10):  # exit 0 under restart: on-failure: it stays stopped…
            while w.state is not WorkerState.STOPPED:
                await anyio.sleep(0.05)
        assert first is None or first["code"] == 0
        with anyio.fail_after(10):  # …and the scheduler is told, so the next request starts it
            while (await client.get(ep.status_url + "/")).json()["backends"]["w"][
                "state"
            ] != "absent":
                await anyio.sleep(0.05)
        r = await chat(client, ep.proxies["w"], stream=False)
        assert r.status_code == 200 and w.state is WorkerState.READY


# --- the CLI against a running broker ---------------------------------------------------------


async def test_workers_commands_list_start_stop_restart_ensure_logs() -> None:
    cfg = make_config(
        {
            "a": managed(gpu=0),
            "b": managed("--child", gpu=1),  # another GPU: both may run at once
            "plain": {"upstream": f"http://127.0.0.1:{free_port()}", "unloadStrategy": "generic"},
        }
    )
    async with broker_running(cfg) as ep:
        url = ["--url", ep.status_url]
        sup = supervisor(ep)
        listed = await cli("workers", "list", *url)
        assert listed.exit_code == 0, listed.output
        assert listed.output.splitlines()[0].split() == [
            "worker", "state", "pid", "gpu", "uptime", "restarts", "vram",
        ]  # fmt: skip
        assert listed.output.splitlines()[1].split()[:2] == ["a", "stopped"]

        started = await cli("workers", "start", "a", *url)
        assert started.exit_code == 0, started.output
        assert f"a is ready, pid {sup.workers['a'].pid}" in started.output
        assert (await cli("workers", "start", "a", *url)).exit_code == 0  # already: fine

        ensured = await cli("workers", "ensure", "--all", *url, "--json")
        assert ensured.exit_code == 0, ensured.output
        data = json.loads(ensured.output)
        assert [(r["name"], r["started"]) for r in data["results"]] == [("a", False), ("b", True)]
        assert all(w["state"] == "ready" for w in data["workers"])
        again = await cli("workers", "ensure", "--all", *url)
        assert again.exit_code == 0 and "a was already ready" in again.output

        row = next(
            x for x in (await cli("workers", "list", *url)).output.splitlines() if x[:2] == "b "
        )
        assert row.split()[1:3] == ["ready", str(sup.workers["b"].pid)]

        logs = await cli("workers", "logs", "b", *url, "-n", "3")
        assert logs.exit_code == 0 and len(logs.output.splitlines()) == 3
        full = await cli("workers", "logs", "b", *url)
        assert "listening on" in full.output and "child pid" in full.output

        old = sup.workers["a"].pid
        restarted = await cli("workers", "restart", "a", *url)
        assert restarted.exit_code == 0, restarted.output
        assert sup.workers["a"].pid not in (None, old) and not alive(old)  # type: ignore[arg-type]

        b_pid = sup.workers["b"].pid
        stopped = await cli("workers", "stop", "--all", *url)
        assert stopped.exit_code == 0, stopped.output
        assert "a stopped (SIGTERM" in stopped.output and "b stopped (SIGKILL" in stopped.output
        assert all(w.state is WorkerState.STOPPED for w in sup.workers.values())
        assert await all_gone([b_pid])  # type: ignore[list-item]
        status = json.loads((await cli("status", *url, "--json")).output)
        assert status["backends"]["a"]["state"] == "absent"  # the scheduler knows

        # bad input: one clear line, the right exit code
        cases = [
            (["workers", "start"], 2, "name one worker, or pass --all"),
            (["workers", "start", "a", "--all"], 2, "not both"),
            (["workers", "ensure"], 2, "name one worker"),
            (["workers", "stop", "a", "--pid", "5"], 2, "give --pid alone"),
            (["workers", "stop", "--pid", "0"], 2, "positive process id"),
            (["workers", "logs", " "], 2, "the worker name is empty"),
            (["workers", "start", "nope"], 1, "no managed worker named 'nope' (a, b)"),
            (["workers", "stop", "nope"], 1, "no managed worker named 'nope'"),
            (["workers", "restart", "nope"], 1, "no managed worker named 'nope'"),
            (["workers", "logs", "nope"], 1, "no managed worker named 'nope'"),
            (["workers", "start", "plain"], 1, "plain is not a managed worker"),
        ]
        for args, code, text in cases:
            message = one_line_error(await cli(*args, *url), code)
            assert text in message, (args, message)
        missing = await cli("workers", "restart", *url)
        assert missing.exit_code == 2 and "Missing argument" in missing.output


async def test_workers_start_after_a_crash_the_scheduler_did_not_hear_of() -> None:
    """A crashed worker waiting for its restart still counts as resident in the scheduler (it
    hears only of an end for good): ``workers start`` forces the eviction first and loads it
    the one way, through the broker's load effect, rather than start it behind its back."""
    cfg = make_config({"w": managed()})
    async with broker_running(cfg) as ep:
        url = ["--url", ep.status_url]
        sup = supervisor(ep)
        sup.backoff = Backoff(first=60.0)  # its own restart would come long after this test
        w = sup.workers["w"]
        assert (await cli("workers", "start", "w", *url)).exit_code == 0
        first = w.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with anyio.fail_after(10):
            while w.backoff_scope is None:
                await anyio.sleep(0.02)
        assert w.state is WorkerState.STARTING and ep.broker.sched.residents() == ["w"]
        started = await cli("workers", "start", "w", *url)
        assert started.exit_code == 0, started.output
        assert f"w is ready, pid {w.pid}" in started.output
        assert w.pid not in (None, first) and w.restarts == 0  # a fresh start, not the restart
        assert w.state is WorkerState.READY and ep.broker.sched.residents() == ["w"]
        pid = w.pid
    assert await all_gone([first, pid])


async def test_ensure_reports_workers_that_cannot_run_together() -> None:
    cfg = make_config({"a": managed(), "b": managed()})  # one GPU, policy exclusive
    async with broker_running(cfg) as ep:
        result = await cli("workers", "ensure", "--all", "--url", ep.status_url)
        assert result.exit_code == 1
        assert "a was stopped again to make room for another worker (policy exclusive)" in (
            result.stdout
        )
        assert "failed: a" in result.stderr


async def test_stop_pid_for_a_stray_and_a_refusal() -> None:
    cfg = make_config({"w": managed()})
    async with broker_running(cfg) as ep:
        url = ["--url", ep.status_url]
        port = free_port()
        env = {**os.environ, MARKER: "old", MARKER_UPSTREAM: f"http://127.0.0.1:{port}"}
        argv = [a.replace("{port}", str(port)) for a in FAKE]
        leftover = popen(argv, env=env, stdout=subprocess.DEVNULL)
        innocent = popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            with anyio.fail_after(10):
                while not port_open(port):
                    await anyio.sleep(0.05)
            done = await cli("workers", "stop", "--pid", str(leftover.pid), *url)
            assert done.exit_code == 0, done.output
            assert f"pid {leftover.pid} stopped (SIGTERM" in done.output
            assert leftover.wait(timeout=5) == 0
            refused = await cli("workers", "stop", "--pid", str(innocent.pid), *url)
            assert refused.exit_code == 1
            assert "neither a GPU process" in refused.stdout
            assert innocent.poll() is None
            await cli("workers", "start", "w", *url)
            worker_pid = supervisor(ep).workers["w"].pid
            via_pid = await cli("workers", "stop", "--pid", str(worker_pid), *url, "--json")
            assert via_pid.exit_code == 0
            assert json.loads(via_pid.output)["results"][0]["name"] == "w"
            assert supervisor(ep).workers["w"].state is WorkerState.STOPPED
        finally:
            for p in (leftover, innocent):
                if p.poll() is None:
                    p.kill()
                p.wait()


async def test_admin_token_guards_worker_verbs_and_logs_but_not_the_list() -> None:
    cfg = make_config({"w": managed()}, adminToken="s3cret")
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
        base = ep.status_url
        assert (await client.get(base + "/api/workers")).status_code == 200
        assert (
            await client.post(base + "/api/workers/start", json={"name": "w"})
        ).status_code == 401
        assert (await client.get(base + "/api/workers/w/logs")).status_code == 401
        bad = await client.post(
            base + "/api/workers/start",
            content=b"[1]",
            headers={"authorization": "Bearer s3cret", "content-type": "application/json"},
        )
        assert bad.status_code == 400
        denied = await cli("workers", "start", "w", "--url", base)
        assert "admin verbs need" in one_line_error(denied, 1)
        ok = await cli("workers", "start", "w", "--url", base, "--token", "s3cret")
        assert ok.exit_code == 0, ok.output


async def test_open_routes_and_events_carry_no_worker_output_nor_command_line() -> None:
    """A worker's output and argv may show its secrets: the open list and ``/events`` say what
    state it is in and why in one line; the log tail and the command need the admin token."""
    cfg = make_config({"bad": managed("--crash-after", "0")}, adminToken="s3cret")
    admin = {"authorization": "Bearer s3cret"}
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
        events: list[dict[str, Any]] = []
        ep.bus.subscribe(on_wire(events.append))  # what /events streams to anyone
        base = ep.status_url
        body = {"name": "bad"}
        started = await client.post(base + "/api/workers/start", json=body, headers=admin)
        assert started.status_code == 200 and started.json()["ok"] is False
        assert "fatal: cannot load model" in "\n".join(started.json()["results"][0]["logTail"])

        public = (await client.get(base + "/api/workers")).json()
        (worker,) = public["workers"]
        assert public["admin"] is False
        assert worker["state"] == "failed" and worker["error"].startswith("exited with code 3")
        assert "logTail" not in worker and "command" not in worker
        assert "fatal" not in json.dumps(public) and "fake_worker" not in json.dumps(public)
        wrong = await client.get(base + "/api/workers", headers={"authorization": "Bearer no"})
        assert "logTail" not in wrong.json()["workers"][0]

        full = (await client.get(base + "/api/workers", headers=admin)).json()
        (worker,) = full["workers"]
        assert full["admin"] is True
        assert "fatal: cannot load model (--crash-after 0)" in worker["logTail"]
        assert "gpubroker.sim.fake_worker" in worker["command"]

        kinds = [e["event"] for e in events]
        assert "worker_starting" in kinds and "worker_failed" in kinds
        for e in events:
            assert not {"logTail", "command", "line"} & set(e), e
        assert "fatal" not in json.dumps(events) and "fake_worker" not in json.dumps(events)

        table = await cli("workers", "list", "--url", base)
        assert table.exit_code == 0 and "bad             failed" in table.stdout
        assert "  | " not in table.stdout and "pass the admin token" in table.stdout
        table = await cli("workers", "list", "--url", base, "--token", "s3cret")
        assert "  | fatal: cannot load model (--crash-after 0)" in table.stdout


async def test_a_worker_on_another_gpu_is_one_warning_from_the_monitor() -> None:
    """Telemetry sees the worker on GPU 0 though it is pinned to GPU 1: one rule, in
    ``alerts.py``, raises ``pinned-to-wrong-GPU``, fed by the monitor's attribution of the
    worker's PIDs; the same samples tell the stop that the memory came back."""
    on_gpu0: list[int] = []

    class Misplaced(TelemetrySource):
        name = "misplaced"

        async def sample(self) -> TelemetrySnapshot:
            procs = tuple(GpuProcess(p, 3 * 2**30, "fake") for p in on_gpu0 if alive(p))
            gpus = (
                GpuSample("GPU-aaaa", 0, "g", memory_total=24 * 2**30, processes=procs),
                GpuSample("GPU-bbbb", 1, "g", memory_total=24 * 2**30),
            )
            return TelemetrySnapshot(taken_at=time.time(), gpus=gpus)

    plugins = create_plugins(env={}, entry_points=False)
    plugins.telemetry["misplaced"] = Provided("misplaced", Misplaced, "t", "t", "0")
    cfg = make_config({"w": managed(gpu=1)}, telemetry="misplaced", telemetryInterval="100ms")
    async with broker_running(cfg, plugins) as ep, httpx.AsyncClient(timeout=20) as client:
        url = ["--url", ep.status_url]
        assert (await cli("workers", "start", "w", *url)).exit_code == 0
        w = supervisor(ep).workers["w"]
        assert w.pid is not None
        on_gpu0.append(w.pid)
        with anyio.fail_after(10):
            while not [
                a
                for a in (await client.get(ep.status_url + "/")).json()["warnings"]
                if a["code"] == "pinned-to-wrong-GPU"
            ]:
                await anyio.sleep(0.05)
        status = (await client.get(ep.status_url + "/")).json()
        (alert,) = status["warnings"]  # one warning: no second rule with another code
        assert (alert["code"], alert["subject"], alert["backend"]) == (
            "pinned-to-wrong-GPU",
            "w on GPU 0",
            "w",
        )
        (listed,) = (await client.get(ep.status_url + "/api/workers")).json()["workers"]
        assert listed["gpu"] == ["GPU-bbbb"] and listed["vram"] == 3 * 2**30
        assert listed["warnings"] == [f"pinned-to-wrong-GPU: {alert['message']}"]
        table = (await cli("workers", "list", *url)).stdout
        assert "  warning: pinned-to-wrong-GPU: w is set to GPU 1 but its pid" in table

        stopped = await cli("workers", "stop", "w", *url, "--json")
        assert stopped.exit_code == 0, stopped.output
        report = json.loads(stopped.output)["results"][0]["report"]
        assert report["vramFreed"] is True and report["portClosed"] is True
        with anyio.fail_after(10):
            while (await client.get(ep.status_url + "/")).json()["warnings"]:
                await anyio.sleep(0.05)


async def test_logs_follow_prints_new_lines_and_ends_cleanly_on_ctrl_c() -> None:
    cfg = make_config({"w": managed()})
    async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
        await supervisor(ep).start("w")
        exe = Path(sys.executable).with_name("gpubroker")
        argv = [str(exe), "workers", "logs", "w", "-f", "--url", ep.status_url]
        async with await anyio.open_process(argv) as proc:
            assert proc.stdout is not None
            seen = b""
            with anyio.fail_after(15):
                async for chunk in proc.stdout:  # the backlog first
                    seen += chunk
                    if b"listening on" in seen:
                        break
                r = await chat(client, ep.proxies["w"], stream=False)
                assert r.status_code == 200
                async for chunk in proc.stdout:  # then what happens next
                    seen += chunk
                    if b"request 1: chat completion" in seen:
                        break
                proc.send_signal(signal.SIGINT)
                code = await proc.wait()
            assert proc.stderr is not None
            err = await proc.stderr.receive() if code else b""
    assert code == 0, err
    assert b"Traceback" not in seen


# --- gpubroker serve killed and started again: tests/workers/test_broker_crash.py ------------


def test_process_strategy_without_a_command_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gpubroker.yaml"
    path.write_text(
        "backends:\n  - name: w\n    proxyPort: 5003\n    upstream: http://127.0.0.1:8081\n"
        "    unloadStrategy: process\n"
    )
    result = runner.invoke(app, ["serve", "--check", "-c", str(path)])
    message = one_line_error(result, 2)
    assert message.startswith(f"{path}:5:5: backends[0].unloadStrategy: the process strategy")
