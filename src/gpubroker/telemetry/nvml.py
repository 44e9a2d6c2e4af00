"""NVML telemetry through nvidia-ml-py. Every NVML call here is blocking: run it in a thread.

Fields the driver will not give come back as ``None`` (never invented). A machine without a
driver is not an error: ``available()`` says why in one line and the broker uses declared sizes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio.to_thread
import pynvml

from gpubroker.errors import TelemetryError
from gpubroker.telemetry.base import (
    GpuProcess,
    GpuSample,
    TelemetrySnapshot,
    TelemetrySource,
)

T = TypeVar("T")

_NO_DRIVER = (
    pynvml.NVMLError_LibraryNotFound,
    pynvml.NVMLError_DriverNotLoaded,
    pynvml.NVMLError_NoPermission,
    pynvml.NVMLError_LibRmVersionMismatch,
)


def _maybe(fn: Callable[[], T]) -> T | None:
    """One NVML read, or None when this GPU or driver cannot answer it."""
    try:
        return fn()
    except pynvml.NVMLError:
        return None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def no_driver_reason(exc: pynvml.NVMLError) -> str:
    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return "no NVIDIA driver found (libnvidia-ml.so.1 is missing)"
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "the NVIDIA driver is not loaded"
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return "no permission to read the NVIDIA driver"
    return f"NVML is unusable: {exc}"


def _process_name(pid: int) -> str | None:
    name = _maybe(partial(pynvml.nvmlSystemGetProcessName, pid))
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return os.path.basename(name) if name else None


def _processes(handle: Any) -> tuple[GpuProcess, ...]:
    """Compute and graphics processes, one entry per pid (a process may be in both lists)."""
    found: dict[int, int | None] = {}
    for read in (
        pynvml.nvmlDeviceGetComputeRunningProcesses,
        pynvml.nvmlDeviceGetGraphicsRunningProcesses,
    ):
        for p in _maybe(partial(read, handle)) or []:
            used = None if p.usedGpuMemory is None else int(p.usedGpuMemory)
            pid = int(p.pid)
            if pid not in found or (used or 0) > (found[pid] or 0):
                found[pid] = used
    return tuple(
        GpuProcess(pid=pid, used_memory=used, name=_process_name(pid))
        for pid, used in found.items()
    )


def read_gpus() -> tuple[GpuSample, ...]:
    """Read every GPU once. Blocking; the caller must have called ``nvmlInit``."""
    samples = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = _maybe(partial(pynvml.nvmlDeviceGetMemoryInfo, h))
        util = _maybe(partial(pynvml.nvmlDeviceGetUtilizationRates, h))
        power = _maybe(partial(pynvml.nvmlDeviceGetPowerUsage, h))
        limit = _maybe(partial(pynvml.nvmlDeviceGetEnforcedPowerLimit, h))
        samples.append(
            GpuSample(
                uuid=str(pynvml.nvmlDeviceGetUUID(h)),
                index=index,
                name=str(pynvml.nvmlDeviceGetName(h)),
                memory_total=None if mem is None else int(mem.total),
                memory_used=None if mem is None else int(mem.used),
                memory_free=None if mem is None else int(mem.free),
                utilization=None if util is None else float(util.gpu),
                power_draw=None if power is None else power / 1000.0,
                power_limit=None if limit is None else limit / 1000.0,
                temperature=_float(
                    _maybe(partial(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU))
                ),
                fan=_float(_maybe(partial(pynvml.nvmlDeviceGetFanSpeed, h))),
                sm_clock=_int(
                    _maybe(partial(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM))
                ),
                mem_clock=_int(
                    _maybe(partial(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM))
                ),
                processes=_processes(h),
            )
        )
    return tuple(samples)


def probe_gpus() -> tuple[tuple[GpuSample, ...], str | None]:
    """Init, read, shut down: for one-off callers such as ``gpubroker init``. Blocking."""
    try:
        pynvml.nvmlInit()
    except _NO_DRIVER as exc:
        return (), no_driver_reason(exc)
    except pynvml.NVMLError as exc:
        return (), f"NVML failed to start: {exc}"
    try:
        return read_gpus(), None
    except pynvml.NVMLError as exc:
        return (), f"NVML failed to read the GPUs: {exc}"
    finally:
        _maybe(pynvml.nvmlShutdown)


class NvmlTelemetry(TelemetrySource):
    """Reads NVIDIA GPUs through NVML; initialised once, shut down by ``close()``."""

    name = "nvml"
    description = "NVIDIA GPUs through NVML (nvidia-ml-py)"

    _initialised = False
    _reason: str | None = None
    _reading = False

    async def available(self) -> str | None:
        if not self._initialised and self._reason is None:
            self._reason = await anyio.to_thread.run_sync(self._init)
        return self._reason

    def _init(self) -> str | None:
        try:
            pynvml.nvmlInit()
        except _NO_DRIVER as exc:
            return no_driver_reason(exc)
        except pynvml.NVMLError as exc:
            return f"NVML failed to start: {exc}"
        self._initialised = True
        return None

    async def sample(self) -> TelemetrySnapshot:
        reason = await self.available()
        if reason:
            return TelemetrySnapshot(taken_at=time.time(), notice=reason)
        if self._reading:  # a driver call hung last time: never pile threads up behind it
            raise TelemetryError("NVML has not answered the previous read yet")
        # Whoever takes ``claim`` first decides: the thread (it reads, then clears the flag) or,
        # when this call ends before the thread started (cancelled at its checkpoint or while
        # waiting for a thread token), this coroutine (nobody reads: it clears the flag).
        claim = threading.Lock()
        self._reading = True
        try:
            # abandon_on_cancel: a hung driver call must not hold the sampler's timeout hostage
            gpus = await anyio.to_thread.run_sync(self._read, claim, abandon_on_cancel=True)
        except pynvml.NVMLError as exc:  # e.g. GPU is lost: this sample fails, the next may not
            raise TelemetryError(f"NVML read failed: {exc}") from exc
        finally:
            if claim.acquire(blocking=False):  # the thread never started, and now never will
                self._reading = False
        return TelemetrySnapshot(taken_at=time.time(), gpus=gpus)

    def _read(self, claim: threading.Lock) -> tuple[GpuSample, ...]:
        if not claim.acquire(blocking=False):
            return ()  # its caller gave up before this thread started: nobody wants it
        try:
            return read_gpus()
        finally:
            self._reading = False

    async def close(self) -> None:
        if self._initialised:
            self._initialised = False
            await anyio.to_thread.run_sync(lambda: _maybe(pynvml.nvmlShutdown))


class NoTelemetry(TelemetrySource):
    """For machines with nothing to read: the broker runs on declared sizes."""

    name = "none"
    description = "No telemetry: declared VRAM sizes only"

    async def sample(self) -> TelemetrySnapshot:
        return TelemetrySnapshot(taken_at=time.time(), notice="telemetry is off")
