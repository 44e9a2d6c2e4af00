"""The health prober: each upstream asked now and then, so the status page and the alerts can
say which are down. A managed worker stopped on purpose is reported in its own state, not
"down"."""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import anyio
import httpx

from gpubroker.config.model import Config
from gpubroker.workers.supervisor import Supervisor, WorkerState

HEALTH_INTERVAL = 10.0


class HealthProbe:
    """Probes every backend each ``interval`` seconds; ``results`` is a live read-only view."""

    def __init__(
        self, config: Config, supervisor: Supervisor | None, interval: float = HEALTH_INTERVAL
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.interval = interval
        self._results: dict[str, dict[str, Any]] = {}
        self.results: Mapping[str, Mapping[str, Any]] = MappingProxyType(self._results)

    async def run(self) -> None:
        """Probe until cancelled."""
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while True:
                await self.probe(client)
                await anyio.sleep(self.interval)

    async def probe(self, client: httpx.AsyncClient) -> None:
        """Ask every backend once."""
        workers = self.supervisor.workers if self.supervisor is not None else {}
        for b in self.config.backends:
            worker = workers.get(b.name)
            if worker is not None and worker.state is not WorkerState.READY:
                # a managed worker stopped on purpose is not "down"
                self._results[b.name] = {"status": worker.state.value, "checkedAt": time.time()}
                continue
            path = b.health_path or "/"
            started = time.perf_counter()
            try:  # the status line is enough: never download what the path serves
                async with client.stream("GET", b.upstream + path) as response:
                    ok = response.status_code < 500
                    detail: dict[str, Any] = {"code": response.status_code}
            except httpx.HTTPError as exc:
                ok, detail = False, {"error": type(exc).__name__}
            self._results[b.name] = {
                "status": "up" if ok else "down",
                "latencyMs": round((time.perf_counter() - started) * 1000, 1),
                "checkedAt": time.time(),
                **detail,
            }

    def reconfigure(self, config: Config) -> None:
        """A reload: probe ``config``'s backends from now on; a removed one's result goes."""
        self.config = config
        names = {b.name for b in config.backends}
        for name in [n for n in self._results if n not in names]:
            del self._results[name]
