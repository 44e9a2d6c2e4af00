"""A generic GPU service with an explicit load/unload API and switches for bad behaviour.

It models *any* service, not a real one: the shape the ``generic`` strategy and classifier
assume (a POST that loads on demand and streams, ``unloadEndpoint`` / ``loadEndpoint``), with
no real service's quirks. Unlike the Ollama, vLLM and ComfyUI emulators, its behaviour mirrors
no source, so nothing here says what a real service does; a real service's behaviour belongs in
an emulator of its own. It lets broker tests provoke the faults a real fleet produces: a stream
that dies mid-body (``crash_after``), a request that hangs before its first byte (``delay``),
an unload that never returns (:attr:`GenericEmulator.unload_hang`).

Routes:

- ``POST /generate`` ``{"prompt"?, "tokens"?: n, "format"?: "sse"|"ndjson", "stream"?: bool,
  "crash_after"?: n, "delay"?: seconds}``: loads on demand (owner ``owner``, tag ``"model"``),
  then streams tokens. SSE chunks are ``data: {"token","index"}`` ending ``data: [DONE]``;
  NDJSON lines are ``{"token","index","done":false}`` ending ``{"done":true}``.
- ``POST /load`` -> ``{"loaded": true}``; ``POST /unload`` -> ``{"loaded": false}``.
- ``GET /health`` -> ``{"status":"ok"}``; ``GET /status`` -> ``{"loaded","state","inflight"}``.

A load that does not fit answers 500 ``{"error": "CUDA out of memory..."}``. Unloading while
requests stream aborts them and counts :attr:`GenericEmulator.unload_with_inflight`, a fault a
broker must never cause.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gpubroker.sim.gpu import OutOfMemory, SimGPU
from gpubroker.sim.service import Changed, EmulatedService
from gpubroker.sim.wire import (
    EVENT_STREAM,
    NDJSON,
    SSE_DONE,
    GuardedStream,
    SimulatedCrash,
    ndjson_line,
    sse_event,
    tokens,
)


class _LoadFailed(Exception):
    pass


@dataclass(eq=False)
class _Attempt:
    done: anyio.Event = field(default_factory=anyio.Event)
    error: str | None = None


@dataclass(eq=False)
class _InFlight:
    aborted: bool = False


class GenericEmulator(EmulatedService):
    """A generic load/unload/stream service on a :class:`SimGPU`. Serve :attr:`app`."""

    def __init__(
        self,
        gpu: SimGPU,
        size: int,
        *,
        load_seconds: float = 0.05,
        unload_seconds: float = 0.02,
        token_interval: float = 0.01,
        tokens: int = 8,
        unload_hang: bool = False,
        owner: str = "generic",
    ) -> None:
        self.size = size
        self.load_seconds = load_seconds
        self.unload_seconds = unload_seconds
        self.token_interval = token_interval
        self.tokens = tokens
        self.state: Literal["absent", "loading", "loaded", "unloading"] = "absent"
        self.loads = 0
        self.unloads = 0
        self.unload_with_inflight = 0
        """Unloads that cut off streaming requests: a broker fault."""
        self._unload_hang = unload_hang
        self._attempt = _Attempt()
        self._inflight: set[_InFlight] = set()
        self._changed = Changed()
        super().__init__(gpu, owner)

    @property
    def unload_hang(self) -> bool:
        """While true, ``POST /unload`` hangs; setting it false lets hung unloads proceed."""
        return self._unload_hang

    @unload_hang.setter
    def unload_hang(self, value: bool) -> None:
        self._unload_hang = value
        self._changed.notify()

    @property
    def loaded(self) -> bool:
        return self.state == "loaded"

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _on_stopped(self) -> None:
        self.state = "absent"
        self._inflight.clear()

    # -- load / unload ------------------------------------------------------------------------

    async def _ensure_loaded(self) -> None:
        while self.state != "loaded":
            if self.state == "absent":
                self._attempt = _Attempt()
                self.state = "loading"
                self.spawn(self._load, self._attempt)
            if self.state == "loading":
                attempt = self._attempt
                await attempt.done.wait()
                if attempt.error is not None:
                    raise _LoadFailed(attempt.error)
            elif self.state == "unloading":
                await self._changed.wait()

    async def _load(self, attempt: _Attempt) -> None:
        # In the background, so a client that gives up does not cancel a load others wait on.
        try:
            await anyio.sleep(self.load_seconds)
            self.gpu.allocate(self.owner, self.size, tag="model")
        except OutOfMemory as exc:
            attempt.error = str(exc)
            self.state = "absent"
        else:
            self.loads += 1
            self.state = "loaded"
        finally:
            attempt.done.set()
            self._changed.notify()

    async def _unload(self) -> None:
        while self._unload_hang:
            await self._changed.wait()
        while self.state in ("loading", "unloading"):
            await self._changed.wait()
        if self.state != "loaded":
            return
        if self._inflight:
            self.unload_with_inflight += 1
            for request_state in self._inflight:
                request_state.aborted = True
        self.state = "unloading"
        self._changed.notify()
        await anyio.sleep(self.unload_seconds)
        self.gpu.free(self.owner, tag="model")
        self.unloads += 1
        self.state = "absent"
        self._changed.notify()

    # -- routes -------------------------------------------------------------------------------

    def _routes(self) -> Sequence[BaseRoute]:
        return [
            Route("/generate", self._generate, methods=["POST"]),
            Route("/load", self._load_route, methods=["POST"]),
            Route("/unload", self._unload_route, methods=["POST"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/status", self._status, methods=["GET"]),
        ]

    async def _health(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _status(self, _request: Request) -> Response:
        return JSONResponse({"loaded": self.loaded, "state": self.state, "inflight": self.inflight})

    async def _load_route(self, _request: Request) -> Response:
        try:
            await self._ensure_loaded()
        except _LoadFailed as exc:
            return JSONResponse({"error": str(exc)}, status_code=500)
        return JSONResponse({"loaded": True})

    async def _unload_route(self, _request: Request) -> Response:
        await self._unload()
        return JSONResponse({"loaded": False})

    async def _generate(self, request: Request) -> Response:
        try:
            body: Any = await request.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
        if delay := float(body.get("delay") or 0):
            await anyio.sleep(delay)
        try:
            await self._ensure_loaded()
        except _LoadFailed as exc:
            return JSONResponse({"error": str(exc)}, status_code=500)
        count = int(body.get("tokens") or self.tokens)
        crash_after = body.get("crash_after")
        ndjson = body.get("format") == "ndjson" or (
            "format" not in body and NDJSON in request.headers.get("accept", "")
        )
        state = _InFlight()
        self._inflight.add(state)

        def done() -> None:
            self._inflight.discard(state)

        if body.get("stream") is False:
            try:
                await anyio.sleep(self.token_interval * count)
                if state.aborted:
                    return JSONResponse({"error": "model was unloaded"}, status_code=500)
                return JSONResponse({"text": "".join(tokens(count)), "tokens": count})
            finally:
                done()

        def encode(obj: dict[str, Any]) -> bytes:
            return ndjson_line(obj) if ndjson else sse_event(obj)

        async def stream() -> AsyncIterator[bytes]:
            for index, word in enumerate(tokens(count)):
                if crash_after is not None and index >= int(crash_after):
                    raise SimulatedCrash(f"simulated crash after {index} chunks")
                await anyio.sleep(self.token_interval)
                if state.aborted:
                    raise SimulatedCrash("model unloaded while streaming")
                chunk: dict[str, Any] = {"token": word, "index": index}
                if ndjson:
                    chunk["done"] = False
                yield encode(chunk)
            yield ndjson_line({"done": True}) if ndjson else SSE_DONE

        return GuardedStream(stream(), on_close=done, media_type=NDJSON if ndjson else EVENT_STREAM)
