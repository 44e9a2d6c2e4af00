"""Detection for ``gpubroker init``: real loopback services, bounded probes, NVML without a GPU."""

from __future__ import annotations

import ctypes.util
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from gpubroker.cli.detect import PROBES, FoundService, Probe, find_gpus, find_services
from gpubroker.telemetry import nvml
from gpubroker.telemetry.base import GpuProcess, GpuSample


def ollama_app() -> Starlette:
    async def version(request: Any) -> JSONResponse:
        return JSONResponse({"version": "0.12.3"})

    return Starlette(routes=[Route("/api/version", version)])


def comfyui_app() -> Starlette:
    async def stats(request: Any) -> JSONResponse:
        return JSONResponse({"system": {"comfyui_version": "0.3.60"}, "devices": []})

    return Starlette(routes=[Route("/system_stats", stats)])


def vllm_starting_app() -> Starlette:
    """A vLLM still loading its model: /v1/models not up yet, /health says 503."""

    async def health(request: Any) -> PlainTextResponse:
        return PlainTextResponse("loading", status_code=503)

    return Starlette(routes=[Route("/health", health)])


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog does) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


def test_default_probes_are_the_usual_ports() -> None:
    assert {(p.kind, p.port) for p in PROBES} == {
        ("ollama", 11434),
        ("comfyui", 8188),
        ("vllm", 8000),
        ("llamacpp", 8080),
    }


@pytest.mark.anyio
async def test_finds_real_services_on_loopback(loopback: Any, closed_port: int) -> None:
    async with (
        loopback(ollama_app()) as ollama,
        loopback(comfyui_app()) as comfyui,
        loopback(vllm_starting_app()) as vllm,
    ):
        probes = (
            Probe("ollama", ollama.port, ("/api/version",)),
            Probe("vllm", closed_port, ("/v1/models", "/health")),
            Probe("comfyui", comfyui.port, ("/system_stats",)),
            Probe("llamacpp", vllm.port, ("/v1/models", "/health")),
            Probe("ollama", comfyui.port, ("/api/version",)),  # a 404 is not Ollama
        )
        found = await find_services(probes=probes)
    assert found == [
        FoundService(
            "ollama", ollama.port, f"http://127.0.0.1:{ollama.port}", "GET /api/version -> 200"
        ),
        FoundService(
            "comfyui",
            comfyui.port,
            f"http://127.0.0.1:{comfyui.port}",
            "GET /system_stats -> 200",
        ),
        FoundService("llamacpp", vllm.port, f"http://127.0.0.1:{vllm.port}", "GET /health -> 503"),
    ]


@pytest.mark.anyio
async def test_closed_port_fails_fast(closed_port: int) -> None:
    started = time.monotonic()
    found = await find_services(probes=(Probe("ollama", closed_port, ("/api/version",)),))
    assert found == []
    assert time.monotonic() - started < 0.5


@pytest.mark.anyio
async def test_hung_port_is_bounded(hung_port: int, closed_port: int, loopback: Any) -> None:
    async with loopback(ollama_app()) as ollama:
        probes = (
            Probe("comfyui", hung_port, ("/system_stats",)),
            Probe("vllm", hung_port, ("/v1/models", "/health")),
            Probe("llamacpp", closed_port, ("/health",)),
            Probe("ollama", ollama.port, ("/api/version",)),
        )
        started = time.monotonic()
        found = await find_services(probes=probes)
        elapsed = time.monotonic() - started
    assert [f.kind for f in found] == ["ollama"]  # the hung ones did not hide the good one
    assert elapsed < 1.6


@pytest.mark.anyio
async def test_per_probe_budget_is_honoured(hung_port: int) -> None:
    started = time.monotonic()
    found = await find_services(
        probes=(Probe("comfyui", hung_port, ("/system_stats",)),), per_probe=0.2
    )
    assert found == []
    assert time.monotonic() - started < 0.8


# --- NVML ----------------------------------------------------------------------------------------

HAS_DRIVER = ctypes.util.find_library("nvidia-ml") is not None


@pytest.mark.skipif(HAS_DRIVER, reason="this machine has an NVIDIA driver")
def test_probe_gpus_without_a_driver() -> None:
    gpus, notice = nvml.probe_gpus()
    assert gpus == ()
    assert notice == "no NVIDIA driver found (libnvidia-ml.so.1 is missing)"


@pytest.mark.skipif(HAS_DRIVER, reason="this machine has an NVIDIA driver")
@pytest.mark.anyio
async def test_find_gpus_without_a_driver() -> None:
    assert await find_gpus() == ((), "no NVIDIA driver found (libnvidia-ml.so.1 is missing)")


@pytest.mark.parametrize(
    ("code", "notice"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver found"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "the NVIDIA driver is not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no permission to read the NVIDIA driver"),
        (pynvml.NVML_ERROR_UNKNOWN, "NVML failed to start: Unknown Error"),
    ],
)
def test_probe_gpus_says_why_not(monkeypatch: pytest.MonkeyPatch, code: int, notice: str) -> None:
    def init() -> None:
        raise pynvml.NVMLError(code)

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    gpus, why = nvml.probe_gpus()
    assert gpus == ()
    assert why is not None and why.startswith(notice)


class FakeNvml:
    """Two GPUs as nvidia-ml-py reports them; the second is a datacenter card that says little."""

    def __init__(self) -> None:
        self.initialised = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in dir(self):
            if name.startswith("nvml"):
                monkeypatch.setattr(pynvml, name, getattr(self, name))

    @staticmethod
    def not_supported() -> pynvml.NVMLError:
        return pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"handle-{index}"

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return {"handle-0": "GPU-aaaa", "handle-1": "GPU-bbbb"}[handle]

    def nvmlDeviceGetName(self, handle: str) -> str:
        return {"handle-0": "NVIDIA GeForce RTX 4090", "handle-1": "NVIDIA H100 80GB HBM3"}[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        if handle == "handle-1":
            raise self.not_supported()
        return SimpleNamespace(total=24 * 2**30, used=9 * 2**30, free=15 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        if handle == "handle-1":
            raise self.not_supported()  # e.g. MIG mode
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return 312_500  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: str) -> int:
        if handle == "handle-1":
            raise self.not_supported()
        return 450_000

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return 64

    def nvmlDeviceGetFanSpeed(self, handle: str) -> int:
        if handle == "handle-1":
            raise self.not_supported()  # datacenter GPUs have no fan reading
        return 55

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        return {pynvml.NVML_CLOCK_SM: 2520, pynvml.NVML_CLOCK_MEM: 10501}[clock]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[SimpleNamespace]:
        if handle == "handle-1":
            raise self.not_supported()
        return [
            SimpleNamespace(pid=4242, usedGpuMemory=8 * 2**30),
            SimpleNamespace(pid=4343, usedGpuMemory=None),  # containers often hide it
        ]


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml()
    fake.install(monkeypatch)
    return fake


def test_read_gpus_reads_what_nvml_gives(fake_nvml: FakeNvml) -> None:
    rtx, h100 = nvml.read_gpus()
    assert rtx == GpuSample(
        uuid="GPU-aaaa",
        index=0,
        name="NVIDIA GeForce RTX 4090",
        memory_total=24 * 2**30,
        memory_used=9 * 2**30,
        memory_free=15 * 2**30,
        utilization=87.0,
        power_draw=312.5,
        power_limit=450.0,
        temperature=64.0,
        fan=55.0,
        sm_clock=2520,
        mem_clock=10501,
        processes=(
            GpuProcess(pid=4242, used_memory=8 * 2**30),
            GpuProcess(pid=4343, used_memory=None),
        ),
    )
    # What the second GPU will not say stays None: never invented, never zero.
    assert h100 == GpuSample(
        uuid="GPU-bbbb",
        index=1,
        name="NVIDIA H100 80GB HBM3",
        power_draw=312.5,
        temperature=64.0,
        sm_clock=2520,
        mem_clock=10501,
    )
    assert h100.memory_total is None and h100.fan is None and h100.utilization is None
    assert h100.processes == ()


def test_probe_gpus_pairs_init_and_shutdown(fake_nvml: FakeNvml) -> None:
    gpus, notice = nvml.probe_gpus()
    assert notice is None
    assert [g.uuid for g in gpus] == ["GPU-aaaa", "GPU-bbbb"]
    assert fake_nvml.initialised == 0


def test_probe_gpus_when_reading_fails(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    def count() -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", count)
    gpus, notice = nvml.probe_gpus()
    assert gpus == ()
    assert notice == "NVML failed to read the GPUs: GPU is lost"
    assert fake_nvml.initialised == 0


@pytest.mark.anyio
async def test_find_gpus_runs_nvml_in_a_thread(fake_nvml: FakeNvml) -> None:
    gpus, notice = await find_gpus()
    assert notice is None
    assert gpus[0].name == "NVIDIA GeForce RTX 4090"
