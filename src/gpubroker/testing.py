"""Helpers for testing against a real broker: for our own tests and for plugin authors.

    async with broker_running(config) as endpoints:
        httpx.post(endpoints.proxies["mybackend"] + "/generate", ...)

Every port is ephemeral on 127.0.0.1, and the broker drains and stops when the block ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio

from gpubroker.config.load import parse_config
from gpubroker.config.model import Config
from gpubroker.plugins.manager import Plugins, create_plugins
from gpubroker.runtime import Endpoints, run_broker


def make_config(backends: Mapping[str, Mapping[str, Any]], **top: Any) -> Config:
    """A Config from ``{name: {"upstream": url, "unloadStrategy": ..., ...}}`` and top keys."""
    entries = [
        {"name": name, "proxyPort": 20000 + i, **spec}
        for i, (name, spec) in enumerate(backends.items())
    ]
    return parse_config({**top, "backends": entries}, source="test")


@asynccontextmanager
async def broker_running(
    config: Config, plugins: Plugins | None = None
) -> AsyncIterator[Endpoints]:
    """Run a broker on ephemeral loopback ports for the duration of the block."""
    shutdown = anyio.Event()
    plugins = plugins or create_plugins(config.disable_plugins)
    async with anyio.create_task_group() as tg:
        start = partial(run_broker, config, plugins, shutdown, ephemeral_ports=True)
        endpoints: Endpoints = await tg.start(start)
        try:
            yield endpoints
        finally:
            shutdown.set()
