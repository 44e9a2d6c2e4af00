"""Stopping a process tree within one deadline, with real processes."""

from __future__ import annotations

import signal
import sys

import anyio
import pytest

from gpubroker.telemetry.base import TelemetrySnapshot
from gpubroker.workers.procs import describe_pid, stop_tree
from processes import all_gone, free_port, gpu_holding, popen

pytestmark = pytest.mark.anyio

IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"


async def test_a_deadline_already_passed_still_kills_and_only_the_waiting_is_cut() -> None:
    stubborn = popen([sys.executable, "-c", IGNORES_TERM], start_new_session=True)
    try:
        await anyio.sleep(0.3)  # let it install its handler
        begun = anyio.current_time()
        report = await stop_tree(
            stubborn.pid,
            5.0,
            deadline=begun,
            address=("127.0.0.1", free_port()),
            telemetry=lambda: gpu_holding(stubborn.pid),
        )
        assert anyio.current_time() - begun < 0.5
        assert report["signal"] == "SIGKILL"  # no time for SIGTERM to work: killed at once
        assert report["vramFreed"] is False  # the one look it had still showed the memory
        assert stubborn.wait(timeout=5) == -signal.SIGKILL  # the kill itself was not skipped
    finally:
        if stubborn.poll() is None:
            stubborn.kill()
            stubborn.wait()


async def test_checks_share_what_the_grace_left_of_the_deadline() -> None:
    sleeper = popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        begun = anyio.current_time()
        report = await stop_tree(
            sleeper.pid,
            5.0,
            deadline=begun + 1.0,
            address=("127.0.0.1", free_port()),
            telemetry=lambda: gpu_holding(sleeper.pid),  # the memory never comes back
        )
        took = anyio.current_time() - begun
        assert 0.9 <= took < 1.4
        assert report["signal"] == "SIGTERM" and report["survivors"] == []
        assert report["portClosed"] is True
        assert report["vramFreed"] is False  # fresh samples still showed it at the deadline
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        sleeper.wait()
    assert await all_gone([sleeper.pid])


async def test_vram_is_confirmed_from_a_sample_taken_after_the_stop() -> None:
    sleeper = popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    stale = gpu_holding(sleeper.pid)
    taken = [stale]

    def telemetry() -> TelemetrySnapshot:
        return taken[-1]

    async with anyio.create_task_group() as tg:

        async def next_sample() -> None:
            await anyio.sleep(0.5)
            taken.append(gpu_holding())  # the monitor's next sample: the memory is back

        tg.start_soon(next_sample)
        report = await stop_tree(sleeper.pid, 5.0, telemetry=telemetry)
    sleeper.wait()
    assert report["vramFreed"] is True and report["ms"] >= 400  # not the stale sample's word


def test_a_pid_is_described_by_its_name_never_its_arguments() -> None:
    secret = popen([sys.executable, "-c", "import time; time.sleep(60)", "--api-key=hunter2"])
    try:
        text = describe_pid(secret.pid)
        assert text.startswith(f"pid {secret.pid} (") and "hunter2" not in text
    finally:
        secret.kill()
        secret.wait()
