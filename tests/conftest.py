"""Shared fixtures: the anyio backend, a clean environment, and real loopback servers."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from gpubroker.proxy.listener import Listener, listen, serve

ENV_VARS = (
    "GPUBROKER_CONFIG",
    "GPUBROKER_DISABLE_PLUGINS",
    "GPUBROKER_URL",
    "GPUBROKER_TOKEN",
    "OLLAMA_UPSTREAM",
    "COMFYUI_UPSTREAM",
    "BROKER_OLLAMA_PORT",
    "BROKER_COMFYUI_PORT",
    "BROKER_STATUS_PORT",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def own_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Each test keeps learned state (footprints) in a directory of its own: nothing is read
    from or written to the user's, and no test learns from another."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No gpubroker env vars, cwd and XDG config in ``tmp_path``: no real config is picked up."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@asynccontextmanager
async def _running(app: Any) -> AsyncIterator[Listener]:
    listener = listen("127.0.0.1", 0)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(serve, app, listener, stop.wait, graceful_timeout=1.0))
        try:
            yield listener
        finally:
            stop.set()


@pytest.fixture
def loopback() -> Callable[[Any], AbstractAsyncContextManager[Listener]]:
    """``async with loopback(app) as listener``: serve an ASGI app on a free 127.0.0.1 port."""
    return _running


SERVERS = ["hypercorn"]
if importlib.util.find_spec("uvicorn") and importlib.util.find_spec("httptools"):
    SERVERS.append("uvicorn")  # the `fast` extra


@pytest.fixture(params=SERVERS)
def broker_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per HTTP server the broker can serve with (the config's ``server``):
    every config made by ``gpubroker.testing.make_config`` gets it, unless it names its own.
    Use it with ``pytestmark = pytest.mark.usefixtures("broker_server")``."""
    import gpubroker.testing

    server: str = request.param
    original = gpubroker.testing.parse_config

    def parse(raw: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return original({"server": server, **raw}, *args, **kwargs)

    monkeypatch.setattr(gpubroker.testing, "parse_config", parse)
    return server
