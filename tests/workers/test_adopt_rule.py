"""The one rule for what an earlier run left of a worker (``adopt.judge``), and the state file's
worker records read back (a bad record dropped, the rest kept)."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import pytest

from gpubroker.workers.adopt import Leftover, judge
from gpubroker.workers.records import WorkerRecord, parse_records, start_time, still_running

OK = Leftover(pid=42, same_command=True, listening=True, healthy=True, age=5.0, doomed=False)


def with_(**changes: Any) -> Leftover:
    return replace(OK, **changes)


@pytest.mark.parametrize(
    ("left", "may_wait", "verdict", "why"),
    [
        (OK, True, "adopt", "healthy"),
        (OK, False, "adopt", "healthy"),
        (with_(same_command=False), True, "stop", "command or GPU pin changed"),
        (with_(doomed=True), True, "stop", "die with its broker"),
        (with_(listening=False, healthy=False), True, "wait", "still starting"),
        (with_(listening=True, healthy=False), True, "wait", "still starting"),
        (with_(listening=False, healthy=False), False, "stop", "not listening after"),
        (with_(listening=False, healthy=False, age=60.0), True, "stop", "not listening after"),
        (with_(healthy=False, age=60.0), True, "stop", "does not answer its health check"),
        (with_(same_command=False, listening=False, age=1.0), True, "stop", "command"),
    ],
    ids=[
        "healthy",
        "healthy-before-a-spawn",
        "command-changed",
        "tied-to-a-dead-broker",
        "loading",
        "listening-not-ready",
        "loading-before-a-spawn",
        "never-listened",
        "unhealthy",
        "changed-while-loading",
    ],
)
def test_judge(left: Leftover, may_wait: bool, verdict: str, why: str) -> None:
    got, reason = judge(left, 30.0, may_wait=may_wait)
    assert got == verdict and why in reason


def test_records_parse_and_a_bad_one_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    me = os.getpid()
    started = start_time(me)
    assert started is not None
    good = {"pid": me, "started": started, "argv": ["x"], "gpu": "0", "upstream": "u", "port": 1}
    with caplog.at_level(logging.WARNING):
        records = parse_records({"a": good, "b": {**good, "pid": "7"}, "c": [1]})
    assert set(records) == {"a"} and len(caplog.records) == 2
    assert still_running(records["a"])
    moved = WorkerRecord(**{**records["a"].to_json(), "argv": ("x",), "started": started - 5})
    assert not still_running(moved)  # same PID, another start time: another process
    assert parse_records("nonsense") == {} and parse_records(None) == {}
