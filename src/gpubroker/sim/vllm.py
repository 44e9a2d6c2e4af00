"""A vLLM emulator: flat VRAM held from start-up, and the sleep/wake API with its traps.

Each behaviour names the vLLM code it mirrors (read in the vllm 0.33.0 wheel from PyPI;
paths under vllm/):

- start-up (the ASGI lifespan, or :meth:`VLLMEmulator.startup`) takes ``load_seconds`` and then
  holds ``weights`` + ``kv_cache`` (+ ``cuda_graphs``) on the :class:`SimGPU` under owner
  ``owner``, tags ``"weights"``, ``"kv_cache"``, ``"cuda_graphs"``; with too little free memory
  it fails with vLLM's "Free memory on device ... is less than desired GPU memory utilization";
- ``/sleep``, ``/wake_up``, ``/is_sleeping``, ``/collective_rpc`` exist only with
  ``VLLM_SERVER_DEV_MODE=1`` (``dev_mode``; entrypoints/launchers/api_server/routers.py:
  register_api_routers), else 404 ``{"detail": "Not Found"}``;
- ``POST /sleep?level=0|1|2&mode=abort|wait|keep`` (entrypoints/serve/dev/sleep/api_router.py)
  answers ``{"status": "sleeping", "level": N}`` once done; v1/engine/core.py:
  EngineCore.sleep first pauses the scheduler (``pause_scheduler``: ``abort`` aborts in-flight
  requests — a fault counted in :attr:`VLLMEmulator.sleep_with_inflight`; ``wait`` lets them
  finish; ``keep`` freezes them), then level 1 moves the weights to host RAM (``host_ram``),
  level 2 discards them, both drop the KV cache, level 0 only pauses. The CUDA graphs stay
  allocated (device_allocator/sleep_mode_backend.py: CuMemBackend.suspend);
- without ``--enable-sleep-mode`` (``sleep_mode=False``) nothing is in the cumem pool, so a
  sleep "succeeds", ``/is_sleeping`` says true, and no byte is freed;
- a request that arrives while the engine sleeps is *queued* (pause_scheduler: "all pause
  modes queue new adds") and runs once ``/wake_up`` has made everything resident again
  (EngineCore.wake_up resumes the scheduler only when fully awake); counted in
  :attr:`VLLMEmulator.requests_while_asleep`, a broker fault, since that request hangs;
- ``/wake_up?tags=`` answers ``{"status": "awake"|"sleeping", "tags": ...}``; a tag that is
  not asleep or unknown makes the executor wake nothing (v1/executor/abstract.py:
  Executor.wake_up only warns); waking level-2 weights without ``reload_weights`` makes every
  answer garbage (vllm#29341);
- ``/collective_rpc`` takes ``{"method", "args"?, "kwargs"?, "timeout"?}``
  (entrypoints/serve/dev/rpc/api_router.py): 400 without ``method``, ``{"results": [null]}``
  for ``reload_weights``;
- ``/health`` stays 200 while asleep (entrypoints/serve/instrumentator/health.py);
  ``GET /version`` answers ``{"version"}`` (entrypoints/serve/instrumentator/basic.py);
- ``GET /server_info?config_format=json|text`` exists in dev mode only (it is one of
  entrypoints/serve/__init__.py: register_vllm_dev_api_routers; dev/server_info/api_router.py):
  ``{"vllm_config", "vllm_env", "system_env"}``, the config as pydantic's JSON dump (its
  ``model_config.enable_sleep_mode`` is ``--enable-sleep-mode``: config/model.py) or, by
  default, as ``str(VllmConfig)`` (config/vllm.py: ``__str__``, which never names sleep mode);
  the emulator fills only the fields named here. It is the one way to learn over HTTP whether
  sleep mode is on: ``/is_sleeping`` and the ``vllm:engine_sleep_state`` gauge answer alike
  without it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from gpubroker.sim.gpu import GiB, OutOfMemory, SimGPU
from gpubroker.sim.service import Changed, EmulatedService
from gpubroker.sim.wire import EVENT_STREAM, SSE_DONE, GuardedStream, sse_event, tokens, unix_now

VERSION = "0.33.0"
TAGS = ("weights", "kv_cache")
MODES = ("abort", "wait", "keep")


class VLLMStartupError(RuntimeError):
    """The engine could not start: not enough free memory for the configured utilisation."""


@dataclass(eq=False)
class _InFlight:
    aborted: bool = False


class VLLMEmulator(EmulatedService):
    """vLLM (OpenAI server, one model) on a :class:`SimGPU`. Serve :attr:`app` to use it."""

    def __init__(
        self,
        gpu: SimGPU,
        model: str,
        weights: int,
        kv_cache: int,
        *,
        dev_mode: bool = True,
        load_seconds: float = 0.05,
        wake_seconds: float = 0.02,
        sleep_seconds: float = 0.01,
        token_interval: float = 0.01,
        cuda_graphs: int = 0,
        max_tokens: int = 8,
        max_model_len: int = 4096,
        owner: str = "vllm",
        sleep_mode: bool = True,
    ) -> None:
        self.model = model
        self.sleep_mode = sleep_mode
        """``--enable-sleep-mode``: without it a sleep frees nothing (the cumem pool is empty)."""
        self.weights = weights
        self.kv_cache = kv_cache
        self.cuda_graphs = cuda_graphs
        self.dev_mode = dev_mode
        self.load_seconds = load_seconds
        self.wake_seconds = wake_seconds
        self.sleep_seconds = sleep_seconds
        self.token_interval = token_interval
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        self.started = False
        self.weights_valid = True
        """False after a level-2 sleep until ``reload_weights``: answers are garbage."""
        self.host_ram = 0
        """Bytes of weights parked in host RAM by a level-1 sleep."""
        self.dead = False
        """Set it to make ``/health`` answer 503 and every request fail, as a dead engine."""
        self.sleep_with_inflight = 0
        """Sleeps requested while requests were in flight (they were aborted): a broker fault."""
        self.requests_while_asleep = 0
        """Inference requests that arrived while the engine slept (they wait): a broker fault."""
        self._asleep: set[str] = set()
        self._freed: set[str] = set()
        """Tags whose memory a sleep really released (none without ``sleep_mode``)."""
        self._pause: str | None = None
        """The scheduler's pause: None, "new" (queue new requests) or "all" (freeze all too)."""
        self._resumed = Changed()
        self._inflight: set[_InFlight] = set()
        self._drained = Changed()
        self._transition = anyio.Lock()
        """Sleep, wake and reload run one at a time, as the engine core handles them."""
        super().__init__(gpu, owner)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def is_sleeping(self) -> bool:
        """v1/engine/core.py: EngineCore.is_sleeping — scheduler paused or memory asleep."""
        return self._pause is not None or bool(self._asleep)

    @property
    def reserved(self) -> int:
        """What start-up holds: vLLM's ``gpu_memory_utilization`` times total, in bytes."""
        return self.weights + self.kv_cache + self.cuda_graphs

    async def startup(self) -> None:
        """Load the model and pre-allocate the KV cache; :class:`VLLMStartupError` if short.

        The lifespan calls this; calling it first by hand is fine (it runs once).
        """
        if self.started:
            return
        await anyio.sleep(self.load_seconds)
        free, total = self.gpu.free_bytes, self.gpu.total
        if self.reserved > free:
            raise VLLMStartupError(
                f"ValueError: Free memory on device ({free / GiB:.2f}/{total / GiB:.2f} GiB) on "
                f"startup is less than desired GPU memory utilization "
                f"({self.reserved / total:.2f}, {self.reserved / GiB:.2f} GiB). Decrease GPU "
                "memory utilization or reduce GPU memory used by other processes."
            )
        self.gpu.allocate(self.owner, self.weights, tag="weights")
        self.gpu.allocate(self.owner, self.kv_cache, tag="kv_cache")
        if self.cuda_graphs:
            self.gpu.allocate(self.owner, self.cuda_graphs, tag="cuda_graphs")
        self._asleep.clear()
        self._freed.clear()
        self._pause = None
        self.weights_valid = True
        self.host_ram = 0
        self.started = True

    def _on_stopped(self) -> None:
        self.started = False
        self._asleep.clear()
        self._freed.clear()
        self._pause = None
        self._inflight.clear()
        self.host_ram = 0

    # -- routes -------------------------------------------------------------------------------

    def _routes(self) -> Sequence[BaseRoute]:
        return [
            Route("/health", self._health, methods=["GET"]),
            Route("/ping", self._health, methods=["GET", "POST"]),
            Route("/version", self._version, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/sleep", self._sleep, methods=["POST"]),
            Route("/wake_up", self._wake_up, methods=["POST"]),
            Route("/is_sleeping", self._is_sleeping, methods=["GET"]),
            Route("/collective_rpc", self._collective_rpc, methods=["POST"]),
            Route("/server_info", self._server_info, methods=["GET"]),
        ]

    async def _health(self, _request: Request) -> Response:
        return Response(status_code=503 if self.dead else 200)

    async def _version(self, _request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def _metrics(self, _request: Request) -> Response:
        label = f'{{engine="0",model_name="{self.model}"}}'
        kv_usage = 0.0 if self._asleep else min(1.0, self.inflight / 64)
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {float(self.inflight)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} 0.0",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{label} {kv_usage}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def _models(self, _request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model,
                        "object": "model",
                        "created": unix_now(),
                        "owned_by": "vllm",
                        "root": self.model,
                        "parent": None,
                        "max_model_len": self.max_model_len,
                        "permission": [
                            {
                                "id": f"modelperm-{uuid.uuid4().hex}",
                                "object": "model_permission",
                                "created": unix_now(),
                                "allow_create_engine": False,
                                "allow_sampling": True,
                                "allow_logprobs": True,
                                "allow_search_indices": False,
                                "allow_view": True,
                                "allow_fine_tuning": False,
                                "organization": "*",
                                "group": None,
                                "is_blocking": False,
                            }
                        ],
                    }
                ],
            }
        )

    # -- sleep mode ---------------------------------------------------------------------------

    async def _sleep(self, request: Request) -> Response:
        if not self.dev_mode:
            return _not_found()
        raw_level = request.query_params.get("level", "1")
        mode = request.query_params.get("mode", "abort")
        try:
            level = int(raw_level)
        except ValueError:
            level = -1
        if level not in (0, 1, 2):  # Annotated[int, Query(ge=0, le=2)]: a validation error
            return _error(
                400, f"level: Input should be 0, 1 or 2, got {raw_level!r}", "Bad Request"
            )
        if mode not in MODES:
            return _error(400, f"mode: Input should be one of {MODES}, got {mode!r}", "Bad Request")
        async with self._transition:
            await self._sleep_now(level, mode)
        return JSONResponse({"status": "sleeping", "level": level})

    async def _sleep_now(self, level: int, mode: str) -> None:
        # v1/engine/core.py: EngineCoreProc.pause_scheduler, then Executor.sleep.
        if mode == "abort":
            if self._inflight:
                self.sleep_with_inflight += 1
            for request_state in self._inflight:
                request_state.aborted = True
        self._pause = "all" if mode == "keep" else "new"
        if mode == "wait":
            while self._inflight:
                await self._drained.wait()
        if level == 0 or "weights" in self._asleep:  # Executor.sleep: "already sleeping"
            return
        await anyio.sleep(self.sleep_seconds)
        for tag in TAGS:
            self._asleep.add(tag)
            if not self.sleep_mode:
                continue  # nothing of ours is in the cumem pool: nothing to free
            freed = self.gpu.free(self.owner, tag=tag)
            self._freed.add(tag)
            if tag == "weights":
                if level == 1:
                    self.host_ram = freed
                else:
                    self.host_ram = 0
                    self.weights_valid = False

    async def _wake_up(self, request: Request) -> Response:
        if not self.dev_mode:
            return _not_found()
        tags: list[str] | None = request.query_params.getlist("tags") or None
        async with self._transition:
            try:
                awake = await self._wake_now(tags)
            except OutOfMemory as exc:
                return _error(500, str(exc), "InternalServerError")
        return JSONResponse({"status": "awake" if awake else "sleeping", "tags": tags})

    async def _wake_now(self, tags: list[str] | None) -> bool:
        # v1/engine/core.py: EngineCore.wake_up; "scheduling" only resumes the scheduler.
        wanted = None if tags is None else [t for t in tags if t != "scheduling"]
        if wanted is None or wanted:
            await self._executor_wake(wanted)
        if not self._asleep:  # fully awake: the scheduler resumes, queued requests run
            self._pause = None
            self._resumed.notify()
        return not self._asleep

    async def _executor_wake(self, tags: list[str] | None) -> None:
        # v1/executor/abstract.py: Executor.wake_up — a tag that is not asleep: warn, no-op.
        if not self._asleep or (tags and any(t not in self._asleep for t in tags)):
            return
        waking = [tag for tag in TAGS if tag in self._asleep and (not tags or tag in tags)]
        await anyio.sleep(self.wake_seconds)
        for tag in waking:
            if tag in self._freed:
                size = self.weights if tag == "weights" else self.kv_cache
                self.gpu.allocate(self.owner, size, tag=tag)  # OutOfMemory: see _wake_up
                self._freed.discard(tag)
            self._asleep.discard(tag)
            if tag == "weights":
                self.host_ram = 0

    async def _is_sleeping(self, _request: Request) -> Response:
        if not self.dev_mode:
            return _not_found()
        return JSONResponse({"is_sleeping": self.is_sleeping})

    async def _server_info(self, request: Request) -> Response:
        if not self.dev_mode:
            return _not_found()
        config_format = request.query_params.get("config_format", "text")
        if config_format not in ("text", "json"):
            return _error(422, f"config_format must be text or json, not {config_format!r}")
        model_config = {
            "model": self.model,
            "max_model_len": self.max_model_len,
            "enable_sleep_mode": self.sleep_mode,
        }
        config: Any = {"model_config": model_config}
        if config_format == "text":
            config = f"model={self.model!r}, max_seq_len={self.max_model_len}"
        return JSONResponse(
            {
                "vllm_config": config,
                "vllm_env": {"VLLM_SERVER_DEV_MODE": True},
                "system_env": {},
            }
        )

    async def _collective_rpc(self, request: Request) -> Response:
        if not self.dev_mode:
            return _not_found()
        try:
            body = await request.json()
        except ValueError as exc:
            return _error(400, f"JSON decode error: {exc}", "Bad Request")
        if not isinstance(body, dict):
            return _error(400, "Request body must be a JSON object", "Bad Request")
        method = body.get("method")
        if method is None:
            return _error(400, "Missing 'method' in request body", "Bad Request")
        if method != "reload_weights":
            return _error(500, f"Worker has no method {method!r}", "InternalServerError")
        async with self._transition:
            if "weights" in self._freed:
                message = "Cannot reload weights while they are asleep"
                return _error(500, message, "InternalServerError")
            await anyio.sleep(self.load_seconds)
            self.weights_valid = True
        return JSONResponse({"results": [None]})

    # -- inference ----------------------------------------------------------------------------

    async def _step(self) -> None:
        """A running request makes no progress while a ``keep`` pause freezes the scheduler."""
        while self._pause == "all":
            await self._resumed.wait()

    async def _chat(self, request: Request) -> Response:
        return await self._infer(request, chat=True)

    async def _completions(self, request: Request) -> Response:
        return await self._infer(request, chat=False)

    async def _infer(self, request: Request, *, chat: bool) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Request body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "Request body must be a JSON object")
        if body.get("model") not in (None, self.model):
            return _error(404, f"The model `{body['model']}` does not exist.", "NotFoundError")
        if self.dead:
            return _error(500, "EngineCore encountered an issue.", "InternalServerError")
        if self._pause is not None:
            # pause_scheduler: new requests are queued until the scheduler resumes.
            self.requests_while_asleep += 1
            while self._pause is not None:
                await self._resumed.wait()
        count = int(body.get("max_completion_tokens") or body.get("max_tokens") or self.max_tokens)
        words = tokens(count, garbage=not self.weights_valid)
        state = _InFlight()
        self._inflight.add(state)

        def done() -> None:
            self._inflight.discard(state)
            if not self._inflight:
                self._drained.notify()

        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = unix_now()
        usage = {"prompt_tokens": 3, "total_tokens": 3 + count, "completion_tokens": count}

        def chunk(text: str | None, finish: str | None, *, first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            choice.update(logprobs=None, finish_reason=finish)
            kind = "chat.completion.chunk" if chat else "text_completion"
            return {
                "id": ident,
                "object": kind,
                "created": created,
                "model": self.model,
                "choices": [choice],
            }

        if not body.get("stream"):
            try:
                produced: list[str] = []
                for word in words:
                    await self._step()
                    if state.aborted:
                        break
                    await anyio.sleep(self.token_interval)
                    produced.append(word)
                finish = "abort" if state.aborted else "length"
                text = "".join(produced)
                if chat:
                    choice: dict[str, Any] = {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "tool_calls": []},
                    }
                else:
                    choice = {"index": 0, "text": text}
                choice.update(logprobs=None, finish_reason=finish)
                kind = "chat.completion" if chat else "text_completion"
                return JSONResponse(
                    {
                        "id": ident,
                        "object": kind,
                        "created": created,
                        "model": self.model,
                        "choices": [choice],
                        "usage": usage,
                    }
                )
            finally:
                done()

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def stream() -> AsyncIterator[bytes]:
            if chat:
                yield sse_event(chunk(None, None, first=True))
            for i, word in enumerate(words):
                await self._step()
                await anyio.sleep(self.token_interval)
                if state.aborted:
                    yield sse_event(chunk("", "abort"))
                    yield SSE_DONE
                    return
                last = i == len(words) - 1
                yield sse_event(chunk(word, "length" if last else None))
            if include_usage:
                yield sse_event(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield SSE_DONE

        return GuardedStream(stream(), on_close=done, media_type=EVENT_STREAM)


def _error(status: int, message: str, kind: str = "BadRequestError") -> Response:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": status}},
        status_code=status,
    )


def _not_found() -> Response:
    return JSONResponse({"detail": "Not Found"}, status_code=404)
