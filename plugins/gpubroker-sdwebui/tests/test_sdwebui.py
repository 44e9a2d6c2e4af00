"""gpubroker-sdwebui, tested as an installed plugin: found through its entry point, run for real."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest
from gpubroker.cli.main import app
from gpubroker.config.model import BackendConfig
from gpubroker.plugins.manager import create_plugins
from gpubroker.plugins.strategies import StrategyContext
from gpubroker.proxy.listener import Listener, listen, serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from typer.testing import CliRunner

from gpubroker_sdwebui import SDWebUIClassifier, SDWebUIFailed, SDWebUIStrategy


def test_gpubroker_plugins_lists_it_from_the_installed_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no gpubroker.yaml of the developer's is picked up
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    for name in ("GPUBROKER_CONFIG", "GPUBROKER_DISABLE_PLUGINS", "OLLAMA_UPSTREAM",
                 "COMFYUI_UPSTREAM"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    for kind in ("strategies", "classifiers"):
        (entry,) = [p for p in listed[kind] if p["name"] == "sdwebui"]
        assert entry["package"] == "gpubroker-sdwebui"
        assert entry["plugin"] == "sdwebui"
        assert entry["version"] == "0.1.0"

    monkeypatch.setenv("GPUBROKER_DISABLE_PLUGINS", "sdwebui")
    result = CliRunner().invoke(app, ["plugins", "--json"])
    listed = json.loads(result.stdout)
    assert "sdwebui" not in [p["name"] for p in listed["strategies"]]
    assert listed["disabled"] == ["sdwebui"]


def test_registered_through_the_hooks() -> None:
    plugins = create_plugins(env={})
    assert plugins.strategies["sdwebui"].cls is SDWebUIStrategy
    assert plugins.classifiers["sdwebui"].cls is SDWebUIClassifier


class WebUI:
    """Just enough of the A1111 API to see which calls the strategy makes."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.loaded = True
        self.job_count = 0
        self.fail = False

    def app(self) -> Starlette:
        async def unload(request: Request) -> JSONResponse:
            return self.answer(request, loaded=False)

        async def reload(request: Request) -> JSONResponse:
            return self.answer(request, loaded=True)

        async def progress(request: Request) -> JSONResponse:
            self.calls.append(f"GET {request.url.path}?{request.url.query}")
            return JSONResponse(
                {"progress": 0.5 if self.job_count else 0.0, "eta_relative": 0.0,
                 "state": {"job_count": self.job_count, "job": "", "sampling_step": 0},
                 "current_image": None, "textinfo": None}
            )  # fmt: skip

        return Starlette(
            routes=[
                Route("/sdapi/v1/unload-checkpoint", unload, methods=["POST"]),
                Route("/sdapi/v1/reload-checkpoint", reload, methods=["POST"]),
                Route("/sdapi/v1/progress", progress, methods=["GET"]),
            ]
        )

    def answer(self, request: Request, *, loaded: bool) -> JSONResponse:
        self.calls.append(f"{request.method} {request.url.path}")
        if self.fail:
            return JSONResponse({"detail": "Internal Server Error"}, status_code=500)
        self.loaded = loaded
        return JSONResponse({})


@asynccontextmanager
async def running(webui: WebUI) -> AsyncIterator[Listener]:
    listener = listen("127.0.0.1", 0)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(serve, webui.app(), listener, stop.wait, graceful_timeout=1.0))
        try:
            yield listener
        finally:
            stop.set()


@asynccontextmanager
async def strategy_for(listener: Listener) -> AsyncIterator[SDWebUIStrategy]:
    backend = BackendConfig(
        name="sd", proxy_port=5004, upstream=listener.url, unload_strategy="sdwebui"
    )
    plugins = create_plugins(env={})
    cls = plugins.strategies["sdwebui"].cls  # the class the broker would get
    async with httpx.AsyncClient(base_url=listener.url, timeout=5, trust_env=False) as client:
        strategy = cls(StrategyContext(backend=backend, client=client, unload_timeout=10))
        assert isinstance(strategy, SDWebUIStrategy)
        yield strategy


@pytest.mark.anyio
async def test_unload_and_load_hit_the_checkpoint_endpoints() -> None:
    webui = WebUI()
    async with running(webui) as listener, strategy_for(listener) as strategy:
        await strategy.unload()
        assert not webui.loaded
        await strategy.load()
        assert webui.loaded
        assert not await strategy.busy()
        webui.job_count = 1
        assert await strategy.busy()
        assert await strategy.resident() is None  # the WebUI cannot say; never guess
    assert webui.calls == [
        "POST /sdapi/v1/unload-checkpoint",
        "POST /sdapi/v1/reload-checkpoint",
        "GET /sdapi/v1/progress?skip_current_image=true",
        "GET /sdapi/v1/progress?skip_current_image=true",
    ]


@pytest.mark.anyio
async def test_a_refusal_raises_with_what_the_webui_said() -> None:
    webui = WebUI()
    webui.fail = True
    async with running(webui) as listener, strategy_for(listener) as strategy:
        with pytest.raises(SDWebUIFailed, match=r"unload-checkpoint answered 500: .*Internal"):
            await strategy.unload()
        with pytest.raises(SDWebUIFailed, match="reload-checkpoint answered 500"):
            await strategy.load()


@pytest.mark.parametrize(
    ("method", "path", "gpu"),
    [
        ("POST", "/sdapi/v1/txt2img", True),
        ("POST", "/sdapi/v1/img2img", True),
        ("POST", "/sdapi/v1/extra-single-image", True),
        ("POST", "/sdapi/v1/extra-batch-images", True),
        ("POST", "/sdapi/v1/interrogate", True),
        ("GET", "/sdapi/v1/txt2img", False),
        ("GET", "/sdapi/v1/progress", False),
        ("POST", "/sdapi/v1/interrupt", False),
        ("POST", "/sdapi/v1/options", False),
        ("GET", "/sdapi/v1/sd-models", False),
        ("GET", "/", False),
        ("POST", "/sdapi/v1/txt2img/extra", False),
    ],
)
def test_classifier(method: str, path: str, gpu: bool) -> None:
    assert SDWebUIClassifier().is_gpu(method, path) is gpu
