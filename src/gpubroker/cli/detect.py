"""Find what ``gpubroker init`` can pre-fill: GPUs (NVML) and services on their usual ports.

Every probe is bounded: a closed port fails in milliseconds, a port that accepts and never
answers costs at most ``per_probe`` seconds, and all probes run at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import anyio.to_thread
import httpx

from gpubroker.telemetry.base import GpuSample


@dataclass(frozen=True, slots=True)
class Probe:
    kind: str  # strategy name the backend would use
    port: int
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FoundService:
    kind: str
    port: int
    upstream: str
    evidence: str  # e.g. "GET /api/version -> 200"


PROBES: tuple[Probe, ...] = (
    Probe("ollama", 11434, ("/api/version",)),
    Probe("comfyui", 8188, ("/system_stats",)),
    Probe("vllm", 8000, ("/v1/models", "/health")),
    Probe("llamacpp", 8080, ("/health", "/v1/models")),
)


async def _probe(client: httpx.AsyncClient, host: str, probe: Probe) -> FoundService | None:
    base = f"http://{host}:{probe.port}"
    for path in probe.paths:
        try:
            response = await client.get(base + path)
        except httpx.HTTPError:
            return None  # closed or hung: nothing to find on this port
        if response.status_code < 400 or (path == "/health" and response.status_code == 503):
            return FoundService(
                probe.kind, probe.port, base, f"GET {path} -> {response.status_code}"
            )
    return None


async def find_services(
    host: str = "127.0.0.1", probes: tuple[Probe, ...] = PROBES, per_probe: float = 1.0
) -> list[FoundService]:
    """Probe every usual port concurrently; services found, in ``probes`` order."""
    results: dict[int, FoundService | None] = {}

    async def run(i: int, probe: Probe, client: httpx.AsyncClient) -> None:
        results[i] = await _probe(client, host, probe)

    limits = httpx.Timeout(per_probe)
    async with httpx.AsyncClient(timeout=limits, trust_env=False) as client:
        with anyio.move_on_after(per_probe + 0.5):
            async with anyio.create_task_group() as tg:
                for i, probe in enumerate(probes):
                    tg.start_soon(run, i, probe, client)
    return [found for i in range(len(probes)) if (found := results.get(i)) is not None]


async def find_gpus() -> tuple[tuple[GpuSample, ...], str | None]:
    """GPUs through NVML in a worker thread; ``(gpus, None)`` or ``((), why not)``."""
    from gpubroker.telemetry.nvml import probe_gpus

    return await anyio.to_thread.run_sync(probe_gpus)
