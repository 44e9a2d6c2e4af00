"""The GPUs: NVML and the driver present, and what the config declares against what they have.

NVML calls block (and a wedged driver can hang one), so they run in a thread the check may
abandon: the doctor then says NVML did not answer rather than waiting for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import anyio.to_thread
import pynvml

from gpubroker.config.model import Config
from gpubroker.config.units import format_size
from gpubroker.doctor.findings import Finding, Severity
from gpubroker.scheduling.domains import capacities
from gpubroker.telemetry.base import GpuSample, TelemetrySnapshot
from gpubroker.telemetry.gpus import aliases, backend_gpus, gpu_key
from gpubroker.telemetry.nvml import no_driver_reason, read_gpus

NVML_LIMIT = 3.0  # seconds NVML gets to start and read every GPU
NO_NVML_FIX = (
    "install the NVIDIA driver (`nvidia-smi` must work, in a container too: the NVIDIA "
    "container toolkit), or set `telemetry: none` and declare `vram:` per backend and "
    "`gpus: [{id: 0, memory: ...}]`"
)


@dataclass(frozen=True, slots=True)
class NvmlReading:
    gpus: tuple[GpuSample, ...] = ()
    driver: str | None = None
    why_not: str | None = None


def read_nvml() -> NvmlReading:
    """Start NVML, read every GPU and the driver's version, shut down. Blocking."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return NvmlReading(why_not=no_driver_reason(exc))
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        return NvmlReading(read_gpus(), driver if isinstance(driver, str) else driver.decode())
    except pynvml.NVMLError as exc:
        return NvmlReading(why_not=f"NVML failed to read the GPUs: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


async def nvml(cfg: Config) -> tuple[list[Finding], TelemetrySnapshot | None]:
    """The NVML finding (per GPU when it reads) and the snapshot the size checks use."""
    if cfg.telemetry in ("none", "sim"):
        why = "telemetry is off" if cfg.telemetry == "none" else "telemetry is simulated"
        return [
            Finding("gpu", "info", f"{why} (`telemetry: {cfg.telemetry}`): NVML not checked")
        ], None
    reading = None
    with anyio.move_on_after(NVML_LIMIT):
        reading = await anyio.to_thread.run_sync(read_nvml, abandon_on_cancel=True)
    if reading is None:
        return [
            Finding(
                "gpu",
                "error",
                f"NVML did not answer within {NVML_LIMIT:g}s: the driver may be wedged",
                "check `nvidia-smi`; a GPU that fell off the bus needs a reset or a reboot",
            )
        ], None
    if reading.why_not is not None:
        severity: Severity = "error" if cfg.telemetry == "nvml" else "warning"
        return [
            Finding(
                "gpu",
                severity,
                f"{reading.why_not}: gpubroker runs on declared sizes only (no measured "
                "footprints, no check that an unload really freed memory)",
                NO_NVML_FIX,
                facts={"nvml": False},
            )
        ], None
    if not reading.gpus:
        return [Finding("gpu", "warning", "NVML works but sees no GPU", NO_NVML_FIX)], None
    out = [
        Finding(
            "gpu",
            "ok",
            f"GPU {g.index}: {g.name}, {format_size(g.memory_total)} "
            f"(driver {reading.driver or 'unknown'})",
            facts={
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "memoryTotal": g.memory_total,
                "driver": reading.driver,
            },
        )
        for g in reading.gpus
    ]
    return out, TelemetrySnapshot(taken_at=0.0, gpus=reading.gpus)


def sizes(cfg: Config, snapshot: TelemetrySnapshot | None) -> list[Finding]:
    """Declared ``vram:`` larger than its GPU; ``gpus:`` larger than the card; a ``gpu:`` that
    names no GPU here. Under ``policy: budget`` a unit that can never fit gets 507."""
    out: list[Finding] = []
    known = aliases(snapshot)
    real = {str(g.index): g.memory_total for g in snapshot.gpus} if snapshot else {}
    if cfg.gpus != "auto":
        for i, spec in enumerate(cfg.gpus):
            key = gpu_key(spec.id, known)
            total = real.get(key)
            if snapshot is not None and key not in real:
                out.append(_no_such_gpu(f"gpus[{i}]", spec.id, real))
            elif spec.memory is not None and total is not None and spec.memory > total:
                out.append(
                    Finding(
                        "config",
                        "warning",
                        f"gpus[{i}] declares {format_size(spec.memory)} for GPU {spec.id}, "
                        f"which has {format_size(total)}: budgets would plan with memory the "
                        "card does not have",
                        f"set gpus[{i}].memory to {format_size(total)} or less, or drop it "
                        "(telemetry's total is used)",
                    )
                )
    caps = capacities(cfg, snapshot)
    severity: Severity = "error" if cfg.policy == "budget" else "warning"
    for i, b in enumerate(cfg.backends):
        keys = backend_gpus(b, snapshot)
        if snapshot is not None:
            for ref in b.gpu:
                if gpu_key(ref, known) not in real:
                    out.append(_no_such_gpu(f"backends[{i}].gpu", ref, real, b.name))
        sized = [(f"backends[{i}].vram", b.vram, b.name)]
        sized += [(f"backends[{i}].models[{j}].vram", m.vram, m.name)
                  for j, m in enumerate(b.models or ())]  # fmt: skip
        for where, vram, what in sized:
            for key in keys:
                cap = caps.get(key)
                if vram is None or cap is None or vram <= cap:
                    continue
                then = (
                    "every request for it gets 507 (it can never fit)"
                    if cfg.policy == "budget"
                    else "under policy: budget every request for it would get 507"
                )
                out.append(
                    Finding(
                        "config",
                        severity,
                        f"{where}: {what} declares {format_size(vram)}, more than GPU {key} "
                        f"can hold ({format_size(cap)} usable): {then}",
                        f"correct {where} (sizes take units: 12GiB), or place {b.name} on a "
                        "larger GPU with `gpu:`",
                        b.name,
                        {"declared": vram, "capacity": cap, "gpu": key},
                    )
                )
    return out


def _no_such_gpu(
    where: str, ref: int | str, real: dict[str, int | None], backend: str | None = None
) -> Finding:
    have = ", ".join(sorted(real)) or "none"
    return Finding(
        "config",
        "error",
        f"{where} names GPU {ref}, which NVML does not see here (GPUs: {have})",
        "name a GPU by an index or UUID `nvidia-smi -L` lists",
        backend,
        {"gpu": str(ref)},
    )
