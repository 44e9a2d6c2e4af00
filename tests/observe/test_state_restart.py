"""What a restart keeps: the swap history and the counters users watch continue in the status
JSON and ``/metrics`` after the broker stops and starts again; a corrupt state file is one
warning, and the broker serves (and writes it anew)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpubroker.config.model import Config
from gpubroker.sim import GenericEmulator, GiB, SimGPU, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio


def two_backends(ua: str, ub: str) -> Config:
    generic = {"unloadStrategy": "generic", "unloadEndpoint": "/unload"}
    return make_config(
        {"a": {"upstream": ua, **generic}, "b": {"upstream": ub, **generic}}, holdTime="0s"
    )


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` by name and (some of) its labels."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in /metrics")


async def snapshot(client: httpx.AsyncClient, url: str) -> tuple[dict[str, Any], str]:
    return (await client.get(url + "/")).json(), (await client.get(url + "/metrics")).text


async def test_history_and_counters_continue_across_a_restart(own_state_dir: Path) -> None:
    gpu = SimGPU(8 * GiB)
    a, b = GenericEmulator(gpu, 3 * GiB, owner="a"), GenericEmulator(gpu, 3 * GiB, owner="b")
    async with running(a.app) as ua, running(b.app) as ub, httpx.AsyncClient(timeout=10) as c:
        cfg = two_backends(ua, ub)
        async with broker_running(cfg) as ep:
            for name in ("a", "b", "a"):  # two swaps: b evicts a, a evicts b
                r = await c.post(ep.proxies[name] + "/generate", json={})
                assert r.status_code == 200
            await c.get(ep.proxies["a"] + "/health")  # a passthrough request
            before, before_metrics = await snapshot(c, ep.status_url)
        saved = json.loads((own_state_dir / "gpubroker" / "state.json").read_text())
        swaps = before["swapCount"]  # b evicted a, a evicted b (and b's unknown start, freed)
        assert swaps >= 2 and saved["sections"]["broker"]["swaps"] == swaps
        async with broker_running(cfg) as ep:
            after, after_metrics = await snapshot(c, ep.status_url)
            await c.post(ep.proxies["b"] + "/generate", json={})  # and they go on counting
            later, later_metrics = await snapshot(c, ep.status_url)
    assert after["swapCount"] == swaps and later["swapCount"] == swaps + 1
    assert after["swaps"] == before["swaps"] and len(later["swaps"]) == swaps + 1
    assert later["swaps"][1:] == before["swaps"]  # newest first, the earlier run's after
    assert after["gpuRequests"] == before["gpuRequests"] == {"a": 2, "b": 1}
    assert after["passthroughRequests"] == before["passthroughRequests"]
    assert later["gpuRequests"] == {"a": 2, "b": 2}
    evicted = {"backend": "b", "reason": "request"}
    for text in (before_metrics, after_metrics):
        assert metric(text, "gpubroker_swaps_total") == swaps
        assert metric(text, "gpubroker_requests_total", backend="a", kind="gpu") == 2
        assert metric(text, "gpubroker_evictions_total", backend="a", reason="request") == 1
    kept = metric(before_metrics, "gpubroker_evictions_total", **evicted)
    assert kept >= 1 and metric(after_metrics, "gpubroker_evictions_total", **evicted) == kept
    assert metric(later_metrics, "gpubroker_evictions_total", backend="a", reason="request") == 2
    assert after["uptime"] < before["uptime"] + 60  # uptime is this run's, not kept


@pytest.mark.parametrize(
    "text",
    [
        '{"version": 1, "sections": [',
        '{"version": 99, "sections": {}}',
        "[1, 2]",
        "\x00\xff",
        '{"version": 1, "sections": {"broker": ' + "[" * 100_000,
    ],
    ids=["truncated", "another-version", "not-ours", "binary", "nested-too-deep"],
)
async def test_a_corrupt_state_file_is_one_warning_and_rewritten(
    own_state_dir: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    path = own_state_dir / "gpubroker" / "state.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    gpu = SimGPU(8 * GiB)
    a, b = GenericEmulator(gpu, 3 * GiB, owner="a"), GenericEmulator(gpu, 3 * GiB, owner="b")
    async with running(a.app) as ua, running(b.app) as ub, httpx.AsyncClient(timeout=10) as c:
        with caplog.at_level(logging.WARNING, "gpubroker.statefile"):
            async with broker_running(two_backends(ua, ub)) as ep:
                assert (await c.post(ep.proxies["a"] + "/generate", json={})).status_code == 200
                st = (await c.get(ep.status_url + "/")).json()
    lines = [r.getMessage() for r in caplog.records if r.name == "gpubroker.statefile"]
    assert len(lines) == 1 and "ignored" in lines[0] and str(path) in lines[0]
    assert st["swapCount"] == len(st["swaps"]) <= 1  # this run's only
    saved = json.loads(path.read_text())
    assert saved["version"] == 1 and saved["sections"]["broker"]["counters"]["a"]["gpu"] == 1


async def test_malformed_records_are_dropped_the_rest_kept(own_state_dir: Path) -> None:
    path = own_state_dir / "gpubroker" / "state.json"
    path.parent.mkdir(parents=True)
    good = {"at": 1.0, "target": "a", "evicted": ["b"], "drain": 0, "unload": 0.1, "load": 0.2}
    broker = {
        "swaps": 7,
        "counters": {"a": {"gpu": 5, "refused": -1}, "gone": {"gpu": 9}},
        "history": [good, {"at": "x"}, {**good, "evicted": "b"}],
    }
    path.write_text(json.dumps({"version": 1, "sections": {"broker": broker}}))
    gpu = SimGPU(8 * GiB)
    a, b = GenericEmulator(gpu, 3 * GiB, owner="a"), GenericEmulator(gpu, 3 * GiB, owner="b")
    async with (
        running(a.app) as ua,
        running(b.app) as ub,
        httpx.AsyncClient(timeout=10) as c,
        broker_running(two_backends(ua, ub)) as ep,
    ):
        st = (await c.get(ep.status_url + "/")).json()
    assert st["swapCount"] == 7 and len(st["swaps"]) == 1 and st["swaps"][0]["to"] == "a"
    assert st["gpuRequests"] == {"a": 5, "b": 0} and st["backends"]["a"]["refused"] == 0


def test_a_history_of_junk_is_one_warning_not_one_per_entry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A state file full of malformed swaps (up to its 4 MiB) costs one log line, not a line for
    each entry on every start."""
    from gpubroker.scheduling.memory import decode

    good = {"at": 1.0, "target": "a", "evicted": ["b"], "drain": 0, "unload": 0.1, "load": 0.2}
    data = {"history": [{"at": "x"}] * 10_000 + [good]}
    with caplog.at_level(logging.WARNING, "gpubroker.scheduling.broker"):
        got = decode(data, ["a"], 50)
    assert [r.info.target for r in got.history] == ["a"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "10000" in lines[0], lines[:3]
