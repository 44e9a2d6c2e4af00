"""Attribution: GPU processes to backends, by pid trees (psutil) or by the simulator's names."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import anyio
import httpx
import pytest

from gpubroker.config.model import BackendConfig
from gpubroker.observe.attribution import (
    Attribution,
    attribute,
    existing,
    find_trees,
    is_local,
    unmanaged,
)
from gpubroker.plugins.manager import Provided, create_plugins
from gpubroker.telemetry.base import (
    GpuProcess,
    GpuSample,
    TelemetrySnapshot,
    TelemetrySource,
)
from gpubroker.testing import broker_running, make_config

GiB = 2**30


def snap(*gpus: tuple[GpuProcess, ...]) -> TelemetrySnapshot:
    return TelemetrySnapshot(
        taken_at=0.0,
        gpus=tuple(
            GpuSample(uuid=f"GPU-{i}", index=i, name="card", processes=procs)
            for i, procs in enumerate(gpus)
        ),
    )


def test_processes_go_to_the_backend_whose_tree_holds_them() -> None:
    s = snap(
        (GpuProcess(10, 4 * GiB, "ollama"), GpuProcess(11, 1 * GiB, "runner")),
        (GpuProcess(20, 2 * GiB, "python3"), GpuProcess(30, 3 * GiB, "stranger")),
    )
    result = attribute(s, ["ollama", "comfyui", "remote"], {"ollama": {1, 10, 11}, "comfyui": {20}})
    owners = {(p.gpu, p.pid): p.owner for p in result.processes}
    assert owners == {
        ("0", 10): "ollama",
        ("0", 11): "ollama",
        ("1", 20): "comfyui",
        ("1", 30): None,
    }
    assert result.measured == {
        "ollama": {"0": 5 * GiB, "1": 0},
        "comfyui": {"0": 0, "1": 2 * GiB},
    }  # "remote" has no tree: untraceable, so absent rather than zero
    assert result.total("ollama") == 5 * GiB and result.total("remote") is None


def test_a_process_that_hides_its_size_makes_the_measurement_unknown() -> None:
    s = snap((GpuProcess(10, 4 * GiB), GpuProcess(11, None)))
    result = attribute(s, ["ollama"], {"ollama": {10, 11}})
    assert result.measured == {"ollama": {"0": None}}
    assert result.total("ollama") is None


def test_a_pid_in_two_trees_counts_once_for_the_first_backend() -> None:
    s = snap((GpuProcess(10, 4 * GiB),))
    result = attribute(s, ["ollama", "ollama-big"], {"ollama-big": {10}, "ollama": {10}})
    assert result.processes[0].owner == "ollama"
    assert result.measured == {"ollama": {"0": 4 * GiB}, "ollama-big": {"0": 0}}


def test_the_simulator_names_owners_and_strangers_stay_unowned() -> None:
    s = snap((GpuProcess(4100, 3 * GiB, "vllm", "vllm"), GpuProcess(4101, GiB, "x", "x")))
    result = attribute(s, ["vllm", "ollama"], {}, owners_named=True)
    assert [(p.pid, p.owner) for p in result.processes] == [(4100, "vllm"), (4101, None)]
    assert result.measured == {"vllm": {"0": 3 * GiB}, "ollama": {"0": 0}}


def test_pids_this_host_cannot_see_are_marked_not_visible() -> None:
    s = snap((GpuProcess(os.getpid(), GiB), GpuProcess(999_999_999, GiB)))
    result = attribute(s, [], {}, visible=existing([os.getpid(), 999_999_999]))
    assert [p.visible for p in result.processes] == [True, False]
    assert Attribution().total("x") is None


def test_unmanaged_memory_is_what_visible_processes_no_backend_owns_hold_per_gpu() -> None:
    s = snap(
        (
            GpuProcess(10, 4 * GiB, "ollama"),  # a backend's: the scheduler counts it already
            GpuProcess(os.getpid(), GiB, "gpubroker"),  # the broker itself: nobody frees it
            GpuProcess(30, 2 * GiB, "desktop"),
            GpuProcess(31, None, "hidden"),  # the driver will not say: nothing to subtract
        ),
        (GpuProcess(999_999_999, 3 * GiB, "ghost"),),  # another pid namespace: maybe ours
        (),
    )
    result = attribute(s, ["ollama"], {"ollama": {10}}, visible=existing([10, os.getpid(), 30, 31]))
    assert unmanaged(result, ["0", "1", "2"]) == {"0": 3 * GiB, "1": 0, "2": 0}
    assert unmanaged(Attribution(), ["0"]) == {"0": 0}  # nothing seen yet: every GPU, at 0


def test_a_process_newer_than_the_last_look_at_the_trees_is_not_counted_yet() -> None:
    s = snap((GpuProcess(30, 2 * GiB, "desktop"), GpuProcess(40, 5 * GiB, "runner")))
    result = attribute(s, ["ollama"], {"ollama": {10}})
    assert unmanaged(result, ["0"], settled={30}) == {"0": 2 * GiB}  # 40 may be ollama's child
    assert unmanaged(result, ["0"], settled={30, 40}) == {"0": 7 * GiB}  # looked again: a stranger


def test_with_owners_named_memory_of_an_owner_that_is_no_backend_is_unmanaged() -> None:
    s = snap(
        (GpuProcess(4100, 3 * GiB, "vllm", "vllm"), GpuProcess(4101, GiB, "other", "other")),
        (GpuProcess(4102, 2 * GiB, "ollama-old", "ollama-old"),),
    )
    result = attribute(s, ["vllm", "ollama"], {}, owners_named=True)
    assert unmanaged(result, ["0", "1"]) == {"0": GiB, "1": 2 * GiB}


def test_is_local() -> None:
    local = {"myhost"}
    assert is_local("127.0.0.1", local) and is_local("::1", local) and is_local("myhost", local)
    assert not is_local("gpu-box.example", local)


LISTENER = """
import socket, subprocess, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(s.getsockname()[1], child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def server_with_runner() -> Iterator[tuple[int, int, int]]:
    """A process listening on a loopback port with a child, like Ollama and its runner."""
    proc = subprocess.Popen([sys.executable, "-c", LISTENER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port, child = (int(x) for x in proc.stdout.readline().split())
    try:
        yield proc.pid, child, port
    finally:
        for pid in (child, proc.pid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        proc.wait(5)
        proc.stdout.close()


def test_find_trees_follows_the_upstream_port_to_the_whole_process_tree(
    server_with_runner: tuple[int, int, int],
) -> None:
    parent, child, port = server_with_runner
    backends = [
        BackendConfig("local", 5001, f"http://127.0.0.1:{port}"),
        BackendConfig("remote", 5002, "http://gpu-box.example:8000"),
        BackendConfig("worker", 5003, "http://127.0.0.1:1"),
    ]
    trees = find_trees(backends, roots={"worker": [parent]})
    assert trees["local"] == {parent, child}
    assert trees["remote"] == set()  # another host's processes are not ours to see
    assert trees["worker"] == {parent, child}  # a managed worker's pid, given as a root
    assert find_trees(backends[:1], roots={"local": [999_999_999]})["local"] == {parent, child}


@pytest.mark.anyio
async def test_a_running_broker_names_the_owner_of_a_real_process_on_the_gpu(
    server_with_runner: tuple[int, int, int],
) -> None:
    """The NVML path end to end: real pids, found through the upstream's listening port."""
    _, child, port = server_with_runner

    class HostPids(TelemetrySource):
        """A GPU on which the runner child holds 5 GiB, and a pid this host does not have."""

        name = "hostpids"

        async def sample(self) -> TelemetrySnapshot:
            procs = (GpuProcess(child, 5 * GiB, "runner"), GpuProcess(999_999_999, GiB, "ghost"))
            return snap(procs)

    plugins = create_plugins(env={}, entry_points=False)
    plugins.telemetry["hostpids"] = Provided("hostpids", HostPids, "t", "t", "0")
    cfg = make_config(
        {"svc": {"upstream": f"http://127.0.0.1:{port}", "unloadStrategy": "generic",
                 "vram": "5GiB"}},
        telemetry="hostpids",
        telemetryInterval="100ms",
    )  # fmt: skip
    async with broker_running(cfg, plugins) as ep, httpx.AsyncClient(timeout=10) as client:
        with anyio.fail_after(5):
            while (status := (await client.get(ep.status_url + "/")).json())["backends"]["svc"][
                "measuredVram"
            ] is None:
                await anyio.sleep(0.05)
    procs = {p["pid"]: p for p in status["gpus"][0]["processes"]}
    assert procs[child]["owner"] == "svc" and procs[child]["visible"] is True
    assert procs[999_999_999]["owner"] is None and procs[999_999_999]["visible"] is False
    assert status["backends"]["svc"]["measuredVram"] == 5 * GiB
    # The ghost is in another pid namespace as far as we can tell: not blamed on anyone.
    assert "unmanaged_gpu_process" not in {w["code"] for w in status["warnings"]}
