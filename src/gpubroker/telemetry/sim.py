"""Telemetry from the simulated GPUs of ``gpubroker.sim``, read from their ``/gpus`` URL.

It lets the demo and the tests show real numbers: memory as the emulators allocate it, and one
process per emulated service, named after it, so attribution needs no pids. Readings the
simulator does not model (utilisation, power, temperature…) stay unknown.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from gpubroker.config.model import Config
from gpubroker.errors import TelemetryError
from gpubroker.telemetry.base import (
    GpuProcess,
    GpuSample,
    TelemetrySnapshot,
    TelemetrySource,
)

TIMEOUT = 2.0


def gpus_url(url: str) -> str:
    """``telemetryUrl`` may be the emulator host's base URL or the full ``/gpus`` URL."""
    return url if urlsplit(url).path not in ("", "/") else url.rstrip("/") + "/gpus"


def parse_gpus(data: Any) -> tuple[GpuSample, ...]:
    """``{"gpus": [SimGPU.snapshot(), ...]}`` into samples; ValueError when malformed."""
    try:
        return tuple(
            GpuSample(
                uuid=str(g["uuid"]),
                index=int(g["index"]),
                name=str(g["name"]),
                memory_total=int(g["total"]),
                memory_used=int(g["used"]),
                memory_free=int(g["free"]),
                processes=tuple(
                    GpuProcess(
                        pid=int(p["pid"]),
                        used_memory=int(p["used"]),
                        name=str(p["owner"]),
                        backend=str(p["owner"]),
                    )
                    for p in g["processes"]
                ),
            )
            for g in data["gpus"]
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a simulated GPU listing ({type(exc).__name__}: {exc})") from None


class SimTelemetry(TelemetrySource):
    """Reads ``telemetryUrl`` (a :func:`gpubroker.sim.gpu_app`) over HTTP."""

    name = "sim"
    description = "Simulated GPUs of the gpubroker.sim emulators (demo, tests), via telemetryUrl"
    names_owners = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.url = gpus_url(config.telemetry_url) if config.telemetry_url else None
        self._client: httpx.AsyncClient | None = None

    async def available(self) -> str | None:
        if self.url is None:
            return "no telemetryUrl set (the simulated GPUs' /gpus URL)"
        try:
            await self._read()
        except TelemetryError as exc:
            return str(exc)
        return None

    async def sample(self) -> TelemetrySnapshot:
        return TelemetrySnapshot(taken_at=time.time(), gpus=await self._read())

    async def _read(self) -> tuple[GpuSample, ...]:
        if self.url is None:
            raise TelemetryError("no telemetryUrl set")
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT, trust_env=False)
        try:
            response = await self._client.get(self.url)
            response.raise_for_status()
            return parse_gpus(response.json())
        except httpx.HTTPError as exc:
            raise TelemetryError(
                f"simulated GPUs at {self.url} not readable ({type(exc).__name__})"
            ) from None
        except ValueError as exc:
            raise TelemetryError(f"simulated GPUs at {self.url}: {exc}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
