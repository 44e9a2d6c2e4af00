"""The supervisor with real processes (the fake worker) on loopback: start, stop, faults.

Every test checks with psutil that the processes it caused are gone afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

from gpubroker.config.model import Config
from gpubroker.errors import WorkerError
from gpubroker.events import EventBus, on_wire
from gpubroker.observe import readmodel
from gpubroker.plugins.strategies.base import Strategy, StrategyContext
from gpubroker.plugins.strategies.process import STOP_SHARE, ProcessStrategy
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.domains import build_scheduler
from gpubroker.statefile import StateFile
from gpubroker.telemetry.base import GpuSample, TelemetrySnapshot
from gpubroker.testing import make_config
from gpubroker.workers.parts import Backoff, LogBuffer
from gpubroker.workers.procs import MARKER, MARKER_UPSTREAM
from gpubroker.workers.start import start_before_load
from gpubroker.workers.supervisor import Supervisor
from gpubroker.workers.worker import WorkerState, render
from processes import FAKE, alive, all_gone, free_port, gpu_holding, popen, port_open

pytestmark = pytest.mark.anyio

FAST = Backoff(first=0.05, factor=2.0, limit=0.2, max_crashes=3, window=30.0)


def worker_config(*args: str, name: str = "w", port: int | None = None, **keys: Any) -> Config:
    port = port or free_port()
    spec = {
        "upstream": f"http://127.0.0.1:{port}",
        "unloadStrategy": "process",
        "command": [*FAKE, *args],
        "healthPath": "/health",
        "startTimeout": "10s",
        "stopTimeout": "2s",
        **keys,
    }
    return make_config({name: spec})


@asynccontextmanager
async def supervising(config: Config, **kw: Any) -> AsyncIterator[Supervisor]:
    kw.setdefault("bus", EventBus())
    sup = Supervisor(config, backoff=kw.pop("backoff", FAST), **kw)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run)
        try:
            yield sup
        finally:
            tg.cancel_scope.cancel()


def listed(sup: Supervisor, client: httpx.AsyncClient) -> tuple[list[Any], list[Any]]:
    """``GET /api/workers``' list for an admin and for anyone, as the read model builds it."""
    strategies: dict[str, Strategy] = {
        b.name: ProcessStrategy(StrategyContext(b, client, 10.0, supervisor=sup))
        for b in sup.config.backends
    }
    sched = build_scheduler(sup.config, strategies, None)
    broker = Broker(sup.config, strategies, sched, EventBus(), supervisor=sup)
    view = readmodel.read(broker)
    return list(view.workers_json(admin=True)), list(view.workers_json(admin=False))


def recorded(sup: Supervisor) -> list[dict[str, Any]]:
    """The events ``sup`` emits (as the broker would pass them to ``/events``), from now on."""
    events: list[dict[str, Any]] = []

    def record(event: dict[str, Any]) -> None:
        event.pop("at")  # what the supervisor says, without the bus's timestamp
        events.append(event)

    sup.bus.subscribe(on_wire(record))
    return events


def child_pid(lines: list[str]) -> int:
    for line in lines:
        if m := re.match(r"child pid (\d+)", line):
            return int(m.group(1))
    raise AssertionError(f"no child pid in {lines}")


@contextmanager
def stray(port: int, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A fake worker started outside any supervisor (an earlier broker's, or a stranger)."""
    argv = [render(a, port=port, gpu="0", name="w") for a in [*FAKE, *args]]
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_open(port):
            assert proc.poll() is None, "the stray worker died"
            assert time.monotonic() < deadline, "the stray worker never listened"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


# --- the ring buffer and placeholders -----------------------------------------------------


def test_log_buffer_splits_lines_keeps_the_last_and_numbers_them() -> None:
    buf = LogBuffer(size=3)
    assert buf.feed(b"one\ntw") == ["one"]
    assert buf.feed(b"o\r\nthree\nfour\n") == ["two", "three", "four"]
    assert buf.flush() == []
    assert buf.tail(10) == ["two", "three", "four"]
    assert buf.since(2) == (["three", "four"], 4)
    assert buf.since(4) == ([], 4)
    assert buf.feed(b"\xff partial") == []
    assert buf.flush() == ["\ufffd partial"]


def test_placeholders_fill_port_gpu_and_name_only() -> None:
    out = render('{"a": 1} --port {port} {gpu_uuid} {name} {other}', port=9, gpu="GPU-x", name="n")
    assert out == '{"a": 1} --port 9 GPU-x n {other}'


# --- start and stop ------------------------------------------------------------------------


async def test_start_pins_waits_for_health_captures_logs_and_stop_reaps_everything(
    tmp_path: Any,
) -> None:
    log_file = tmp_path / "w.log"
    cfg = worker_config(
        "--start-delay",
        "0.3",
        "--child",
        "--model",
        "{gpu_uuid}",
        gpu="GPU-1234abcd",
        env={"EXTRA": "x{port}"},
        logFile=str(log_file),
        stopTimeout="500ms",
    )
    port = int(cfg.backends[0].upstream.rsplit(":", 1)[1])
    async with supervising(cfg) as sup:
        events = recorded(sup)
        started = time.monotonic()
        await sup.start("w")
        w = sup.workers["w"]
        assert w.state is WorkerState.READY
        assert time.monotonic() - started >= 0.3  # it waited for the health check
        assert sup.resident("w") is True
        async with httpx.AsyncClient() as client:
            models = (await client.get(f"http://127.0.0.1:{port}/v1/models")).json()
        assert models["data"][0]["id"] == "GPU-1234abcd"  # {gpu_uuid} filled in
        pid = w.pid
        assert pid is not None
        env = psutil.Process(pid).environ()
        assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1234abcd"
        assert env[MARKER] == "w" and env["EXTRA"] == f"x{port}"
        assert os.getpgid(pid) == pid  # its own process group
        child = child_pid(w.log.tail(50))
        assert alive(child)
        await sup.start("w")  # idempotent: still the same process
        assert w.pid == pid
        report = await sup.stop("w")
        assert w.state is WorkerState.STOPPED and w.pid is None
        assert report["signal"] == "SIGKILL"  # the child ignores SIGTERM: the tree needed it
        assert report["portClosed"] is True and report["survivors"] == []
        assert child in report["pids"]
        assert sup.resident("w") is False
    assert await all_gone([pid, child])  # the child ignored SIGTERM: it was killed, not orphaned
    assert not port_open(port)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "worker_starting" and "worker_ready" in kinds
    assert kinds[-2:] == ["worker_stopping", "worker_stopped"]
    assert "listening on" in log_file.read_text()


async def test_sigterm_ignored_means_sigkill_after_stop_timeout() -> None:
    cfg = worker_config("--ignore-sigterm", stopTimeout="500ms")
    async with supervising(cfg) as sup:
        await sup.start("w")
        pid = sup.workers["w"].pid
        assert pid is not None
        report = await sup.stop("w")
        assert report["signal"] == "SIGKILL"
        assert 500 <= report["ms"] < 5000
        assert any(
            "SIGTERM received: ignoring it" in line for line in sup.workers["w"].log.tail(50)
        )
    assert await all_gone([pid])


async def test_stop_during_a_slow_start_does_not_wait_for_it() -> None:
    cfg = worker_config("--start-delay", "20", startTimeout="30s")
    async with supervising(cfg) as sup, anyio.create_task_group() as tg:
        outcome: list[str] = []

        async def start() -> None:
            try:
                await sup.start("w")
                outcome.append("started")
            except WorkerError as exc:
                outcome.append(str(exc))

        tg.start_soon(start)
        with anyio.fail_after(5):
            while sup.workers["w"].pid is None:
                await anyio.sleep(0.02)
        pid = sup.workers["w"].pid
        assert pid is not None
        begun = time.monotonic()
        await sup.stop("w")
        assert time.monotonic() - begun < 3
    assert outcome == ["w: stopped while starting"]
    assert sup.workers["w"].state is WorkerState.STOPPED
    assert await all_gone([pid])


async def test_slow_start_past_start_timeout_fails_with_its_log_and_leaves_nothing() -> None:
    cfg = worker_config("--start-delay", "20", startTimeout="600ms")
    async with supervising(cfg) as sup:
        with pytest.raises(WorkerError) as info:
            await sup.start("w")
        w = sup.workers["w"]
        assert str(info.value) == (
            "w: not ready after startTimeout 0.6s (its log: gpubroker workers logs w)"
        )
        assert w.state is WorkerState.FAILED and w.pid is None
        async with httpx.AsyncClient() as client:
            [described], [public] = listed(sup, client)
        assert described["state"] == "failed"
        assert any("loading model" in line for line in described["logTail"])
        assert described["command"][1:3] == ["-m", "gpubroker.sim.fake_worker"]
        # for the open /api/workers: no output, no command line
        assert "logTail" not in public and "command" not in public
        assert public["error"] == "not ready after startTimeout 0.6s"
        pids = [int(m.group(1)) for line in w.log.tail(50) if (m := re.search(r"pid (\d+)", line))]
    assert pids and await all_gone(pids)


async def test_bad_command_fails_in_one_line() -> None:
    cfg = make_config(
        {
            "w": {
                "upstream": f"http://127.0.0.1:{free_port()}",
                "unloadStrategy": "process",
                "command": ["/nonexistent/llama-server", "--port", "{port}"],
            }
        }
    )
    async with supervising(cfg) as sup:
        with pytest.raises(WorkerError, match="cannot run '/nonexistent/llama-server'"):
            await sup.start("w")
        assert sup.workers["w"].state is WorkerState.FAILED
        with pytest.raises(WorkerError, match="no managed worker named 'nope'"):
            await sup.start("nope")


# --- crashes -------------------------------------------------------------------------------


async def test_a_crash_is_restarted_with_backoff() -> None:
    cfg = worker_config("--crash-after", "1")
    async with supervising(cfg) as sup:
        events = recorded(sup)
        await sup.start("w")
        w = sup.workers["w"]
        first = w.pid
        assert first is not None
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.HTTPError):
                await client.post(w.spec.upstream + "/v1/chat/completions", json={})
        with anyio.fail_after(10):
            while not (w.state is WorkerState.READY and w.pid not in (None, first)):
                await anyio.sleep(0.02)
        assert w.restarts == 1
        assert w.last_exit is not None and w.last_exit["code"] == 3
        crashed = next(e for e in events if e["event"] == "worker_crashed")
        assert crashed["code"] == 3 and crashed["restartIn"] == FAST.first
        assert "logTail" not in crashed  # events are open to anyone: no output in them
        second = w.pid
    assert await all_gone([first, second])  # type: ignore[list-item]


async def test_a_crash_loop_is_marked_failed_with_the_tail_of_its_log() -> None:
    cfg = worker_config("--die-after", "0.3")
    async with supervising(cfg) as sup:
        events = recorded(sup)
        await sup.start("w")
        w = sup.workers["w"]
        with anyio.fail_after(20):
            while w.state is not WorkerState.FAILED:
                await anyio.sleep(0.05)
        assert w.error is not None and w.error.startswith("crash loop: exited 3 times")
        (failed,) = [e for e in events if e["event"] == "worker_failed"]
        assert failed["error"] == w.error and set(failed) == {"event", "backend", "error"}
        assert all("command" not in e and "line" not in e for e in events)
        async with httpx.AsyncClient() as client:
            [described], _ = listed(sup, client)
        assert any("dying on purpose" in line for line in described["logTail"])
        assert w.restarts == 2 and w.pid is None
        pids = [int(m.group(1)) for line in w.log.tail(200) if (m := re.search(r"pid (\d+)", line))]
        await sup.start("w")  # an explicit start tries again
        assert w.state is WorkerState.READY
        pids.append(w.pid)  # type: ignore[arg-type]
    assert await all_gone(pids)


async def test_restart_never_fails_at_the_first_crash() -> None:
    cfg = worker_config("--die-after", "0.3", restart="never")
    async with supervising(cfg) as sup:
        await sup.start("w")
        w = sup.workers["w"]
        pid = w.pid
        with anyio.fail_after(10):
            while w.state is not WorkerState.FAILED:
                await anyio.sleep(0.05)
        assert w.error == "exited with code 1 (restart: never)" and w.restarts == 0
    assert await all_gone([pid])  # type: ignore[list-item]


# --- leftovers of an earlier run, and strangers ---------------------------------------------


async def test_a_healthy_leftover_of_an_earlier_run_is_adopted_not_duplicated() -> None:
    port = free_port()
    cfg = worker_config(port=port)
    upstream = cfg.backends[0].upstream
    marker = {MARKER: "w", MARKER_UPSTREAM: upstream, "CUDA_VISIBLE_DEVICES": "0"}
    with stray(port, env=marker) as old:
        async with supervising(cfg) as sup:
            w = sup.workers["w"]
            assert w.state is WorkerState.READY and w.adopted and w.pid == old.pid
            await sup.start("w")  # nothing new is spawned
            assert w.pid == old.pid
            await sup.stop("w")
            assert w.state is WorkerState.STOPPED
        assert old.wait(timeout=5) == 0  # SIGTERM: it shut down cleanly
    assert not port_open(port)


async def test_a_leftover_with_another_command_is_stopped_and_a_new_one_started() -> None:
    port = free_port()
    cfg = worker_config(port=port)
    upstream = cfg.backends[0].upstream
    marker = {MARKER: "w", MARKER_UPSTREAM: upstream, "CUDA_VISIBLE_DEVICES": "0"}
    with stray(port, "--tokens", "3", env=marker) as old:
        async with supervising(cfg) as sup:
            w = sup.workers["w"]
            assert w.state is WorkerState.STOPPED and w.pid is None
            assert old.wait(timeout=5) == 0
            await sup.start("w")
            assert w.pid != old.pid and not w.adopted
            new = w.pid
    assert await all_gone([new])  # type: ignore[list-item]


async def test_a_stranger_on_the_port_is_never_killed_nor_duplicated() -> None:
    port = free_port()
    cfg = worker_config(port=port)
    with stray(port) as stranger:
        async with supervising(cfg) as sup:
            w = sup.workers["w"]
            assert w.error and "which gpubroker did not start" in w.error
            with pytest.raises(WorkerError, match="refusing to start a second w"):
                await sup.start("w")
            assert w.state is WorkerState.FAILED
            assert stranger.poll() is None  # left alone
            listeners = {
                c.pid
                for c in psutil.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port
            }
            assert listeners == {stranger.pid}


async def test_stop_pid_stops_a_marked_stray_and_refuses_strangers() -> None:
    port = free_port()
    seen = [TelemetrySnapshot(taken_at=time.time())]  # what the monitor last sampled
    async with supervising(worker_config(), telemetry=lambda: seen[-1]) as sup:
        with stray(port, env={MARKER: "old", MARKER_UPSTREAM: "x"}) as leftover:
            report = await sup.stop_pid(leftover.pid, grace=2.0)
            assert report["stopped"] and report["signal"] == "SIGTERM"
            assert leftover.wait(timeout=5) == 0
        other = popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            with pytest.raises(WorkerError, match="neither a GPU process"):
                await sup.stop_pid(other.pid)
            assert other.poll() is None
            seen.append(gpu_holding(other.pid))
            await sup.stop_pid(other.pid, grace=2.0)  # now a GPU process: allowed
            assert other.wait(timeout=5) == -signal.SIGTERM
        finally:
            if other.poll() is None:
                other.kill()
                other.wait()
        with pytest.raises(WorkerError, match="gpubroker itself"):
            await sup.stop_pid(os.getpid())
        with pytest.raises(WorkerError, match="no process with pid"):
            await sup.stop_pid(2**22 + 12345)


# --- pinning and shutdown ------------------------------------------------------------------


async def test_workers_are_pinned_by_uuid_where_telemetry_knows_it() -> None:
    """Indexes become the UUIDs the monitor's sample names; the check that each runs where it
    is pinned is the monitor's (``pinned-to-wrong-GPU`` in ``alerts.py``), not the supervisor's.
    """
    cfg = worker_config(gpu=[1, "GPU-0"])
    seen = TelemetrySnapshot(
        taken_at=time.time(),
        gpus=tuple(GpuSample(uuid=f"GPU-{i}{i}{i}", index=i, name="g") for i in range(2)),
    )
    async with supervising(cfg, telemetry=lambda: seen) as sup:
        await sup.start("w")
        w = sup.workers["w"]
        assert w.pid is not None
        assert psutil.Process(w.pid).environ()["CUDA_VISIBLE_DEVICES"] == "GPU-111,GPU-000"
        assert sup.roots() == {"w": [w.pid]}  # what the monitor traces the worker's tree from
        pid = w.pid
    assert await all_gone([pid])


async def test_cancelling_the_supervisor_stops_every_worker() -> None:
    cfg = make_config(
        {
            name: {
                "upstream": f"http://127.0.0.1:{free_port()}",
                "unloadStrategy": "process",
                "command": [*FAKE, *extra],
                "healthPath": "/health",
                "stopTimeout": "1s",
                "autostart": True,
            }
            for name, extra in [("a", ["--child"]), ("b", ["--ignore-sigterm"])]
        }
    )
    pids: list[int] = []
    with anyio.fail_after(20):
        async with supervising(cfg) as sup:
            with anyio.fail_after(10):
                while any(w.state is not WorkerState.READY for w in sup.workers.values()):
                    await anyio.sleep(0.05)
            for w in sup.workers.values():
                assert w.pid is not None
                pids.append(w.pid)
            pids.append(child_pid(sup.workers["a"].log.tail(50)))
    assert await all_gone(pids)
    assert all(w.state is WorkerState.STOPPED for w in sup.workers.values())


# --- the process strategy on its own --------------------------------------------------------


async def test_process_strategy_needs_a_supervisor_and_fits_stops_into_unload_timeout() -> None:
    cfg = worker_config(stopTimeout="10s")
    backend = cfg.backends[0]
    async with httpx.AsyncClient() as client:
        alone = ProcessStrategy(StrategyContext(backend, client, unload_timeout=10.0))
        with pytest.raises(WorkerError, match="the process strategy needs a managed worker"):
            await alone.load()
        assert alone.term_grace() == 6.0  # 60% of unloadTimeout: room left to kill and reap
        assert alone.stop_limit() == 9.0  # the whole stop, checks included
        short = worker_config(stopTimeout="2s").backends[0]
        assert ProcessStrategy(StrategyContext(short, client, 10.0)).term_grace() == 2.0
        async with supervising(cfg) as sup:
            strategy = ProcessStrategy(StrategyContext(backend, client, 10.0, supervisor=sup))
            assert await strategy.resident() is False
            with pytest.raises(WorkerError, match="w: stopped when it should be ready"):
                await strategy.load()  # it only confirms: the start comes before it
            await start_before_load(None, "w")  # no supervisor, or a backend it does not
            await start_before_load(sup, "plain")  # manage: nothing to start
            assert await strategy.resident() is False
            await start_before_load(sup, "w")  # as the broker's load effect does
            await strategy.load()
            assert await strategy.resident() is True
            pid = sup.workers["w"].pid
            await strategy.unload()
            assert await strategy.resident() is False
    assert await all_gone([pid])  # type: ignore[list-item]


async def test_an_eviction_stop_keeps_to_its_share_of_unload_timeout() -> None:
    """SIGTERM ignored, and a GPU that goes on showing the worker's memory: the stop's phases
    (SIGTERM, SIGKILL and reaping, the port, the VRAM) share one deadline inside unloadTimeout
    rather than adding up (the grace, then 5 s + 5 s + 10 s, as they once did)."""
    cfg = worker_config("--ignore-sigterm", "--child", stopTimeout="10s")
    held: list[int] = []
    async with supervising(cfg, telemetry=lambda: gpu_holding(*held)) as sup:
        async with httpx.AsyncClient() as client:
            ctx = StrategyContext(cfg.backends[0], client, unload_timeout=2.0, supervisor=sup)
            strategy = ProcessStrategy(ctx)
            await start_before_load(sup, "w")
            await strategy.load()
        w = sup.workers["w"]
        assert w.pid is not None
        pids = [w.pid, child_pid(w.log.tail(50))]
        held.extend(pids)  # dead or alive, the GPU keeps listing them
        begun = time.monotonic()
        await strategy.unload()
        took = time.monotonic() - begun
        report = w.last_stop
        assert report is not None and report["signal"] == "SIGKILL"
        assert 1.2 <= took < 2.0 * STOP_SHARE + 0.4  # SIGTERM's 60%, all of it within 90%
        assert report["survivors"] == [] and report["portClosed"] is True
        assert report["vramFreed"] is False  # not confirmed by the deadline, and said so
        assert w.state is WorkerState.STOPPED
    assert await all_gone(pids)


# --- the state file's records ------------------------------------------------------------------


async def test_a_recorded_worker_no_longer_configured_is_stopped_and_a_live_one_adopted(
    tmp_path: Path,
) -> None:
    """An earlier run's worker whose backend left the config would hold VRAM with nobody
    owning it: stopped. One still configured, unmarked (found by its record alone), adopted."""
    port, gone_port = free_port(), free_port()
    cfg = worker_config(port=port)
    with stray(port) as mine, stray(gone_port) as orphan:
        started = {p.pid: psutil.Process(p.pid).create_time() for p in (mine, orphan)}

        def record(pid: int, port_: int) -> dict[str, Any]:
            argv = [render(a, port=port_, gpu="0", name="w") for a in FAKE]
            upstream = f"http://127.0.0.1:{port_}"
            return {"pid": pid, "started": started[pid], "argv": argv, "gpu": "0",
                    "upstream": upstream, "port": port_, "detach": True, "tied": False}  # fmt: skip

        state = StateFile(tmp_path / "state.json")
        section = {"workers": {"w": record(mine.pid, port), "old": record(orphan.pid, gone_port)}}
        doc = {"version": 1, "sections": {"workers": section}}
        (tmp_path / "state.json").write_text(json.dumps(doc))
        await state.load()
        async with supervising(cfg, state=state) as sup:
            w = sup.workers["w"]
            assert w.state is WorkerState.READY and w.adopted and w.pid == mine.pid
            assert orphan.wait(timeout=5) == 0  # SIGTERM: it shut down cleanly
            await sup.stop("w")
        assert mine.wait(timeout=5) == 0
    saved = json.loads((tmp_path / "state.json").read_text())["sections"]["workers"]
    assert saved["workers"] == {} and saved["broker"]["pid"] == os.getpid()
