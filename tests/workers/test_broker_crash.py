"""A real ``gpubroker serve`` SIGKILLed while its managed worker runs, then started again.

The worker is the fake worker (``gpubroker.sim.fake_worker``) as a real process. Tied to its
broker (the default), it dies with it (the parent-death wrapper, Linux); ``detach: true`` keeps
it, and the next start adopts that very process (the state file's record, same PID and start
time), or stops it when the command changed, and never starts a second copy beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import psutil
import pytest

from gpubroker.workers import deathsig
from processes import FAKE, alive, all_gone, free_port

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not deathsig.SUPPORTED, reason="a parent-death signal is Linux's"),
]

EXE = str(Path(sys.executable).with_name("gpubroker"))


def write_config(path: Path, status_port: int, port: int, *extra: str, **keys: Any) -> Path:
    command = json.dumps([*FAKE, *extra])
    lines = [
        f"statusPort: {status_port}",
        f"stateDir: {path.parent / 'state'}",
        "backends:",
        f"  - name: w\n    proxyPort: {free_port()}\n    upstream: http://127.0.0.1:{port}",
        f"    unloadStrategy: process\n    command: {command}\n    healthPath: /v1/models",
        "    autostart: true\n    stopTimeout: 2s\n    startTimeout: 20s",
        *(f"    {k}: {json.dumps(v)}" for k, v in keys.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.asynccontextmanager
async def serving(config: Path) -> AsyncIterator[anyio.abc.Process]:
    """``gpubroker serve`` as a process; SIGKILLed on the way out if it still runs (a process
    left running would make the block's exit wait for it forever)."""
    env = {**os.environ, "GPUBROKER_DISABLE_PLUGINS": ""}
    proc = await anyio.open_process([EXE, "serve", "-c", str(config)], env=env)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with anyio.move_on_after(10):
            await proc.wait()
        await proc.aclose()


async def worker_state(status_port: int, state: str = "ready") -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        with anyio.fail_after(40):
            while True:
                try:
                    r = await client.get(f"http://127.0.0.1:{status_port}/api/workers")
                    worker: dict[str, Any] = r.json()["workers"][0]
                    if worker["state"] == state and worker["pid"] is not None:
                        return worker
                except (httpx.HTTPError, KeyError, IndexError, ValueError):
                    pass
                await anyio.sleep(0.05)


async def recorded(state_dir: Path, pid: int) -> dict[str, Any]:
    """The state file's record of worker ``w`` once it names ``pid`` (written as it spawns)."""
    with anyio.fail_after(10):
        while True:
            try:
                state = json.loads((state_dir / "state.json").read_text())
                record: dict[str, Any] = state["sections"]["workers"]["workers"]["w"]
                if record["pid"] == pid:
                    return record
            except (OSError, ValueError, KeyError):
                pass
            await anyio.sleep(0.05)


async def logs(client: httpx.AsyncClient, url: str) -> list[str]:
    lines: list[str] = (await client.get(url)).json()["lines"]
    return lines


def fakes_on(port: int) -> list[int]:
    """Fake workers serving ``port`` (whatever started them)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "gpubroker.sim.fake_worker" in " ".join(cmd) and str(port) in cmd:
            out.append(p.pid)
    return out


@pytest.fixture
def cleanup() -> Any:
    ports: list[int] = []
    yield ports
    for port in ports:
        for pid in fakes_on(port):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


async def test_a_tied_worker_and_its_children_die_when_the_broker_is_killed(
    tmp_path: Path, cleanup: list[int]
) -> None:
    status_port, port = free_port(), free_port()
    cleanup.append(port)
    config = write_config(tmp_path / "gpubroker.yaml", status_port, port, "--child")
    async with serving(config) as broker:
        worker = await worker_state(status_port)
        tree = [p.pid for p in psutil.Process(worker["pid"]).children(recursive=True)]
        assert tree  # its child (which ignores SIGTERM) and the wrapper's watchdog
        broker.kill()
        await broker.wait()
    # The leader gets SIGTERM from the kernel; the child, which ignores it, the group's SIGKILL
    # once the broker is seen gone and stopTimeout has passed.
    assert await all_gone([worker["pid"], *tree], limit=20)


async def test_a_detached_worker_survives_a_crash_and_is_adopted_never_doubled(
    tmp_path: Path, cleanup: list[int]
) -> None:
    status_port, port = free_port(), free_port()
    cleanup.append(port)
    config = write_config(tmp_path / "gpubroker.yaml", status_port, port, detach=True)
    async with serving(config) as first:
        pid = (await worker_state(status_port))["pid"]
        record = await recorded(tmp_path / "state", pid)
        first.kill()
        await first.wait()
    assert alive(pid)
    assert record["detach"] is True and record["tied"] is False
    assert record["started"] == pytest.approx(psutil.Process(pid).create_time(), abs=0.5)
    async with serving(config) as second:
        adopted = await worker_state(status_port)
        assert adopted["pid"] == pid and adopted["adopted"] is True
        assert fakes_on(port) == [pid]  # no second copy
        second.send_signal(signal.SIGTERM)  # an ordinary stop leaves a detached worker too
        with anyio.fail_after(20):
            assert await second.wait() == 0
    assert alive(pid)
    # The command changed: the next start stops the old process and starts the new one.
    config = write_config(
        tmp_path / "gpubroker.yaml", status_port, port, "--tokens", "3", detach=True
    )
    async with serving(config):
        fresh = await worker_state(status_port)
        assert fresh["pid"] != pid and fresh["adopted"] is False
        assert await all_gone([pid])
        assert fakes_on(port) == [fresh["pid"]]
        # Its output goes to a file (nothing of ours it could lose), followed into its log.
        url = f"http://127.0.0.1:{status_port}/api/workers/w/logs"
        async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
            with anyio.fail_after(10):
                while True:
                    lines = await logs(client, url)
                    if any("listening on" in x for x in lines):
                        break
                    await anyio.sleep(0.1)
        assert any("[gpubroker] detached: its output goes to" in x for x in lines)
    assert f"listening on http://127.0.0.1:{port}" in (tmp_path / "state/workers/w.log").read_text()


async def test_a_worker_still_loading_when_the_broker_died_is_waited_for_not_doubled(
    tmp_path: Path, cleanup: list[int]
) -> None:
    status_port, port = free_port(), free_port()
    cleanup.append(port)
    config = write_config(
        tmp_path / "gpubroker.yaml", status_port, port, "--start-delay", "3", detach=True
    )
    async with serving(config) as first:
        pid = (await worker_state(status_port, "starting"))["pid"]
        await recorded(tmp_path / "state", pid)
        first.kill()
        await first.wait()
    assert alive(pid) and fakes_on(port) == [pid]
    async with serving(config):
        seen = await worker_state(status_port, "ready")
        assert seen["pid"] == pid and seen["adopted"] is True
        assert fakes_on(port) == [pid]


async def test_a_corrupt_state_file_is_ignored_and_the_broker_serves(
    tmp_path: Path, cleanup: list[int]
) -> None:
    status_port, port = free_port(), free_port()
    cleanup.append(port)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text('{"version": 1, "sections": [')
    config = write_config(tmp_path / "gpubroker.yaml", status_port, port)
    async with serving(config) as broker:
        await worker_state(status_port)
        broker.send_signal(signal.SIGTERM)
        with anyio.fail_after(20):
            assert await broker.wait() == 0
        assert broker.stderr is not None
        chunks = []
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                chunks.append(await broker.stderr.receive())
        err = b"".join(chunks).decode()
    assert err.count("state file") == 1 and "ignored (not JSON" in err
    saved = json.loads((tmp_path / "state" / "state.json").read_text())  # rewritten whole
    assert saved["version"] == 1 and saved["sections"]["workers"]["workers"] == {}
