"""A read-only HTTP view of simulated GPUs, so the ``sim`` telemetry source can read them.

The emulators and the broker may share one process (demo, tests) but a telemetry source is built
from config, so it reads the simulated card the way it would read any other: over a URL.
``GET /gpus`` answers ``{"gpus": [SimGPU.snapshot(), ...]}``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gpubroker.sim.gpu import SimGPU


def gpu_app(*gpus: SimGPU) -> Starlette:
    """An ASGI app serving ``GET /gpus`` for ``gpus`` (serve it with :func:`running`)."""

    async def listing(request: Request) -> JSONResponse:
        return JSONResponse({"gpus": [gpu.snapshot() for gpu in gpus]})

    return Starlette(routes=[Route("/gpus", listing)])
