"""Telemetry sources and the sampler: NVML through a fake pynvml, the sim source over HTTP.

The fake NVML module mirrors nvidia-ml-py: the same function names and parameters (checked
against the installed library), its ctypes return types, and its own error classes, raised by
code the way the library raises them (``NVMLError(code)`` picks the subclass).
"""

from __future__ import annotations

import inspect
import threading
import types
from pathlib import Path
from typing import Any

import anyio
import pynvml
import pytest

from gpubroker.config.load import load_config_file, parse_config
from gpubroker.errors import ConfigError, TelemetryError
from gpubroker.plugins.manager import Provided, choose_source, create_plugins
from gpubroker.sim import GiB, SimGPU, gpu_app, running
from gpubroker.telemetry import nvml
from gpubroker.telemetry.base import (
    GpuProcess,
    TelemetrySnapshot,
    TelemetrySource,
)
from gpubroker.telemetry.sampler import Sampler, SingleFlight
from gpubroker.telemetry.sim import SimTelemetry, gpus_url

MiB = 2**20


class FakeNvml:
    """A driver with two GPUs: a workstation card and a datacenter card that says less."""

    def __init__(self) -> None:
        self.refs = 0  # nvmlInit/nvmlShutdown are reference-counted, as in the library
        self.inits = 0
        self.no_driver = False
        self.lost = False
        self.hang: threading.Event | None = None
        self.threads: set[int] = set()
        self.reads = 0  # reads of every GPU begun (each starts by counting them)

    def module(self) -> types.ModuleType:
        """A stand-in ``pynvml`` module: our functions, the library's constants and errors."""
        fake = types.ModuleType("pynvml")
        for name in dir(pynvml):
            if not name.startswith("nvml"):
                setattr(fake, name, getattr(pynvml, name))
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(fake, name, getattr(self, name))
        return fake

    def _check(self) -> None:
        self.threads.add(threading.get_ident())
        if self.refs == 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        if self.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if self.hang is not None:
            self.hang.wait(10)

    # --- the library's functions, same names and parameters --------------------------------

    def nvmlInit(self) -> None:
        if self.no_driver:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        self.refs += 1
        self.inits += 1

    def nvmlShutdown(self) -> None:
        if self.refs == 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        self.refs -= 1

    def nvmlDeviceGetCount(self) -> int:
        self.reads += 1
        self._check()
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self._check()
        return f"handle-{index}"

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return {"handle-0": "GPU-aaaa", "handle-1": "GPU-bbbb"}[handle]

    def nvmlDeviceGetName(self, handle: str) -> str:
        return {"handle-0": "NVIDIA GeForce RTX 4090", "handle-1": "NVIDIA H100 80GB HBM3"}[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: str, version: Any = None) -> Any:
        self._check()
        if handle == "handle-1":
            return pynvml.c_nvmlMemory_t(total=80 * GiB, free=79 * GiB, used=1 * GiB)
        return pynvml.c_nvmlMemory_t(total=24 * GiB, free=15 * GiB, used=9 * GiB)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        if handle == "handle-1":
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)  # MIG mode
        return pynvml.c_nvmlUtilization_t(gpu=87, memory=40)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return 312_500  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: str) -> int:
        return 450_000 if handle == "handle-0" else 700_000

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return 64

    def nvmlDeviceGetFanSpeed(self, handle: str) -> int:
        if handle == "handle-1":
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)  # no fan on datacenter cards
        return 55

    def nvmlDeviceGetClockInfo(self, handle: str, type: int) -> int:  # upstream names it `type`
        return {pynvml.NVML_CLOCK_SM: 2520, pynvml.NVML_CLOCK_MEM: 10501}[type]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:
        if handle == "handle-1":
            return []
        return [
            pynvml.nvmlFriendlyObject(
                {"pid": 4242, "usedGpuMemory": 8 * GiB, "gpuInstanceId": 0, "computeInstanceId": 0}
            ),
            # In containers the driver cannot say: nvidia-ml-py turns NOT_AVAILABLE into None.
            pynvml.nvmlFriendlyObject(
                {"pid": 4343, "usedGpuMemory": None, "gpuInstanceId": 0, "computeInstanceId": 0}
            ),
        ]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: str) -> list[Any]:
        if handle == "handle-1":
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [  # a process using the GPU both ways is listed in both lists
            pynvml.nvmlFriendlyObject(
                {"pid": 4242, "usedGpuMemory": 8 * GiB, "gpuInstanceId": 0, "computeInstanceId": 0}
            ),
            pynvml.nvmlFriendlyObject(
                {
                    "pid": 1717,
                    "usedGpuMemory": 300 * MiB,
                    "gpuInstanceId": 0,
                    "computeInstanceId": 0,
                }
            ),
        ]

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        if pid == 4343:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return {4242: "/usr/bin/ollama", 1717: "/usr/lib/xorg/Xorg"}[pid]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    driver = FakeNvml()
    monkeypatch.setattr(nvml, "pynvml", driver.module())
    return driver


def config(**top: Any):  # type: ignore[no-untyped-def]
    return parse_config({**top, "backends": []}, source="test")


def test_the_fake_mirrors_nvidia_ml_py() -> None:
    for name, fn in inspect.getmembers(FakeNvml, inspect.isfunction):
        if not name.startswith("nvml"):
            continue
        assert hasattr(pynvml, name), f"nvidia-ml-py has no {name}"
        ours = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert ours == list(inspect.signature(getattr(pynvml, name)).parameters), name
    # The library's own behaviour the fake copies: a code picks its error class.
    assert type(pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)) is pynvml.NVMLError_GpuIsLost
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        FakeNvml().nvmlDeviceGetCount()


@pytest.mark.anyio
async def test_nvml_reads_every_field_and_leaves_unknowns_unknown(fake: FakeNvml) -> None:
    source = nvml.NvmlTelemetry(config())
    assert await source.available() is None
    snap = await source.sample()
    rtx, h100 = snap.gpus
    assert (rtx.uuid, rtx.index, rtx.name) == ("GPU-aaaa", 0, "NVIDIA GeForce RTX 4090")
    assert (rtx.memory_total, rtx.memory_used, rtx.memory_free) == (24 * GiB, 9 * GiB, 15 * GiB)
    assert (rtx.utilization, rtx.power_draw, rtx.power_limit) == (87.0, 312.5, 450.0)
    assert (rtx.temperature, rtx.fan, rtx.sm_clock, rtx.mem_clock) == (64.0, 55.0, 2520, 10501)
    assert rtx.processes == (
        GpuProcess(pid=4242, used_memory=8 * GiB, name="ollama"),
        GpuProcess(pid=4343, used_memory=None, name=None),  # unknown, not zero
        GpuProcess(pid=1717, used_memory=300 * MiB, name="Xorg"),
    )
    assert h100.fan is None and h100.utilization is None  # NotSupported stays unknown
    assert h100.power_limit == 700.0 and h100.processes == ()
    await source.close()
    assert fake.refs == 0


@pytest.mark.anyio
async def test_nvml_is_initialised_once_read_off_the_loop_and_shut_down(fake: FakeNvml) -> None:
    source = nvml.NvmlTelemetry(config())
    sampler = Sampler(source)
    for _ in range(3):
        await sampler.sample()
    assert fake.inits == 1 and fake.refs == 1
    assert threading.get_ident() not in fake.threads  # every read ran in a worker thread
    await sampler.close()
    assert fake.refs == 0


@pytest.mark.anyio
async def test_gpu_lost_mid_run_is_reported_unknown_and_sampling_goes_on(fake: FakeNvml) -> None:
    sampler = Sampler(nvml.NvmlTelemetry(config()))
    good = await sampler.sample()
    assert good.error is None and good.gpus[0].memory_used == 9 * GiB
    fake.lost = True
    lost = await sampler.sample()
    assert lost.error == "NVML read failed: GPU is lost"
    assert [(g.uuid, g.index) for g in lost.gpus] == [("GPU-aaaa", 0), ("GPU-bbbb", 1)]
    assert all(g.memory_used is None and g.processes == () for g in lost.gpus)
    assert sampler.latest is lost
    fake.lost = False
    back = await sampler.sample()
    assert back.error is None and back.gpus[0].memory_used == 9 * GiB
    await sampler.close()


@pytest.mark.anyio
async def test_a_hung_driver_call_is_bounded_and_never_piles_up(fake: FakeNvml) -> None:
    sampler = Sampler(nvml.NvmlTelemetry(config()), timeout=0.2)
    await sampler.sample()
    fake.hang = threading.Event()
    try:
        with anyio.fail_after(3):
            hung = await sampler.sample()
            again = await sampler.sample()
        assert hung.error == "nvml: no answer in 0.2s"
        assert again.error == "NVML has not answered the previous read yet"
    finally:
        fake.hang.set()
        fake.hang = None
    with anyio.fail_after(3):
        while (await sampler.sample()).error:  # the abandoned read finishes, then all is well
            await anyio.sleep(0.05)
    await sampler.close()


async def in_the_driver(fake: FakeNvml, reads: int) -> None:
    """Until ``reads`` reads have begun (the last one is now waiting on ``fake.hang``)."""
    with anyio.fail_after(3):
        while fake.reads < reads:
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_samples_asked_for_together_are_one_driver_read(fake: FakeNvml) -> None:
    sampler = Sampler(nvml.NvmlTelemetry(config()))
    assert await sampler.source.available() is None
    got: list[TelemetrySnapshot] = []

    async def ask() -> None:
        got.append(await sampler.sample())

    fake.hang = threading.Event()
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(3):  # the monitor's loop, an unload's confirmation, start-up…
                tg.start_soon(ask)
            await in_the_driver(fake, 1)
            await anyio.sleep(0.05)  # the others ask while the read is in the driver
            fake.hang.set()
    finally:
        fake.hang.set()
        fake.hang = None
    assert fake.reads == 1  # NVML would have failed a second read begun meanwhile
    assert got[0].error is None and got[0].gpus[0].memory_used == 9 * GiB
    assert got == [got[0]] * 3 and all(snap is got[0] for snap in got)
    assert sampler.latest is got[0]
    await sampler.close()


@pytest.mark.anyio
async def test_a_sample_whose_caller_gives_up_still_reaches_those_waiting(
    fake: FakeNvml,
) -> None:
    sampler = Sampler(nvml.NvmlTelemetry(config()))
    assert (await sampler.sample()).error is None
    got: list[TelemetrySnapshot] = []
    first = anyio.CancelScope()

    async def ask(scope: anyio.CancelScope) -> None:
        with scope:
            got.append(await sampler.sample())

    fake.hang = threading.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, first)  # e.g. an unload's confirmation, that will time out
            await in_the_driver(fake, 2)
            tg.start_soon(ask, anyio.CancelScope())  # …and the monitor's loop
            await anyio.sleep(0.05)
            first.cancel()  # its caller gives up; abandoned, the read would fail the next
            await anyio.sleep(0.05)
            fake.hang.set()
    finally:
        fake.hang.set()
        fake.hang = None
    assert got and all(snap.error is None for snap in got), got
    assert got[-1].gpus[0].memory_used == 9 * GiB and fake.reads == 2
    assert (await sampler.sample()).error is None
    await sampler.close()


@pytest.mark.anyio
async def test_an_nvml_read_cancelled_before_its_thread_started_does_not_block_the_next(
    fake: FakeNvml,
) -> None:
    source = nvml.NvmlTelemetry(config())
    assert await source.available() is None
    with anyio.CancelScope() as scope:
        scope.cancel()  # cancelled at the thread call's first checkpoint
        await source.sample()
    assert scope.cancelled_caught and fake.reads == 0
    snap = await source.sample()  # not "NVML has not answered the previous read yet"
    assert snap.gpus[0].memory_used == 9 * GiB and fake.reads == 1
    await source.close()


@pytest.mark.anyio
async def test_a_sample_timed_out_waiting_for_a_worker_thread_does_not_block_the_next(
    fake: FakeNvml,
) -> None:
    sampler = Sampler(nvml.NvmlTelemetry(config()), timeout=0.1)
    assert (await sampler.sample()).error is None
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens, limiter.total_tokens = limiter.total_tokens, 1
    done = anyio.Event()

    async def hold_the_only_thread(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with limiter:
            task_status.started()
            await done.wait()

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(hold_the_only_thread)  # every worker thread busy elsewhere
            busy = await sampler.sample()
            done.set()
    finally:
        limiter.total_tokens = tokens
    assert busy.error == "nvml: no answer in 0.1s" and fake.reads == 1
    back = await sampler.sample()
    assert back.error is None and back.gpus[0].memory_used == 9 * GiB and fake.reads == 2
    await sampler.close()


@pytest.mark.anyio
async def test_single_flight_shares_a_result_but_not_a_failure() -> None:
    calls: list[str] = []
    release = anyio.Event()

    async def work() -> str:
        calls.append("call")
        await release.wait()
        if len(calls) == 1:
            raise RuntimeError("first call fails")
        return f"result of call {len(calls)}"

    flight = SingleFlight(work)
    got: list[str | BaseException] = []

    async def ask() -> None:
        try:
            got.append(await flight())
        except RuntimeError as exc:
            got.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(ask)
        await anyio.sleep(0.05)
        assert calls == ["call"]  # one call in progress, two callers waiting on it
        release.set()
    # The one that called gets its error; the others run one call for both of them.
    assert isinstance(got[0], RuntimeError)
    assert got[1:] == ["result of call 2", "result of call 2"] and len(calls) == 2


@pytest.mark.anyio
async def test_no_driver_falls_back_to_none_with_a_one_line_notice(fake: FakeNvml) -> None:
    fake.no_driver = True
    plugins = create_plugins(env={}, entry_points=False)
    source, notice = await choose_source(config(), plugins)
    assert source.name == "none"
    assert notice == "no NVIDIA driver found (libnvidia-ml.so.1 is missing)"
    named, why = await choose_source(config(telemetry="nvml"), plugins)
    assert named.name == "none"
    assert why == "nvml: no NVIDIA driver found (libnvidia-ml.so.1 is missing)"
    off, quiet = await choose_source(config(telemetry="none"), plugins)
    assert off.name == "none" and quiet is None
    snap = await Sampler(source, notice=notice).sample()
    assert snap.gpus == () and snap.notice == notice and snap.error is None


@pytest.mark.anyio
async def test_auto_takes_the_simulated_gpu_when_it_is_configured(fake: FakeNvml) -> None:
    fake.no_driver = True
    gpu = SimGPU(8 * GiB, name="Sim 8G")
    gpu.allocate("ollama", 3 * GiB)
    async with running(gpu_app(gpu)) as url:
        source, notice = await choose_source(
            config(telemetryUrl=url), create_plugins(env={}, entry_points=False)
        )
        assert source.name == "sim" and notice is None
        snap = await source.sample()
        await source.close()
    (g,) = snap.gpus
    assert (g.name, g.memory_total, g.memory_used, g.memory_free) == (
        "Sim 8G",
        8 * GiB,
        3 * GiB,
        5 * GiB,
    )
    assert g.processes == (GpuProcess(gpu.pid("ollama"), 3 * GiB, "ollama", backend="ollama"),)
    assert g.utilization is None and g.power_draw is None  # not simulated, so not invented


@pytest.mark.anyio
async def test_sim_endpoint_down_is_a_failed_sample_not_a_crash() -> None:
    gpu = SimGPU(8 * GiB)
    async with running(gpu_app(gpu)) as url:
        sampler = Sampler(SimTelemetry(config(telemetry="sim", telemetryUrl=url)))
        assert (await sampler.sample()).gpus[0].memory_total == 8 * GiB
    down = await sampler.sample()  # the emulators' host stopped
    assert down.error == f"simulated GPUs at {url}/gpus not readable (ConnectError)"
    assert down.gpus[0].uuid == gpu.uuid and down.gpus[0].memory_total is None
    assert await sampler.source.available() == down.error
    await sampler.close()


@pytest.mark.anyio
async def test_a_plugin_source_that_fails_or_hangs_is_passed_over() -> None:
    class Broken(TelemetrySource):
        name = "broken"

        async def available(self) -> str | None:
            raise RuntimeError("boom")

    class Slow(TelemetrySource):
        name = "slow"

        async def available(self) -> str | None:
            await anyio.sleep(10)
            return None

    plugins = create_plugins(env={}, entry_points=False)
    for cls in (Broken, Slow):
        plugins.telemetry[cls.name] = Provided(cls.name, cls, "t", "t", "0")
    source, why = await choose_source(config(telemetry="broken"), plugins)
    assert source.name == "none" and why == "broken: failed: RuntimeError: boom"
    with anyio.fail_after(2):
        source, why = await choose_source(config(telemetry="slow"), plugins, limit=0.1)
    assert source.name == "none" and why == "slow: did not answer within 0.1s"


def test_sim_url_may_be_the_base_or_the_listing() -> None:
    assert gpus_url("http://127.0.0.1:9000") == "http://127.0.0.1:9000/gpus"
    assert gpus_url("http://127.0.0.1:9000/gpus") == "http://127.0.0.1:9000/gpus"


@pytest.mark.anyio
async def test_sim_listing_that_is_not_one_is_a_telemetry_error(loopback: Any) -> None:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def wrong(request: Any) -> JSONResponse:
        return JSONResponse({"gpus": [{"name": "x"}]})

    async with loopback(Starlette(routes=[Route("/gpus", wrong)])) as up:
        source = SimTelemetry(config(telemetry="sim", telemetryUrl=up.url))
        with pytest.raises(TelemetryError, match="not a simulated GPU listing"):
            await source.sample()
        await source.close()


def test_telemetry_keys_are_validated_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("statusPort: 5102\ntelemetry: sim\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value).startswith(f"{path}:2:1: telemetry: `telemetry: sim` needs")
    path.write_text("telemetryInterval: 10ms\n")
    with pytest.raises(ConfigError, match=r":1:1: telemetryInterval: expected an interval"):
        load_config_file(path)
    path.write_text("gpuNearFull: 120%\n")
    with pytest.raises(ConfigError, match=r":1:1: gpuNearFull: expected a fraction"):
        load_config_file(path)
    path.write_text("gpuNearFull: 90%\ntelemetryInterval: 500ms\ntelemetryUrl: http://h:1/\n")
    cfg = load_config_file(path)
    assert (cfg.gpu_near_full, cfg.telemetry_interval, cfg.telemetry_url) == (
        0.9,
        0.5,
        "http://h:1",
    )
