"""An Ollama emulator: the routes, stream formats and scheduler behaviour a broker relies on.

Each behaviour below names the function of Ollama it mirrors (read at ollama v0.33.0-rc2,
commit fb30760: server/sched.go, server/routes.go, api/types.go, envconfig/config.go):

- one runner per model, loaded on demand by a single scheduler task that handles requests in
  order (``(*Scheduler).processPending``), evicting idle runners of ours beyond ``max_loaded``
  (``OLLAMA_MAX_LOADED_MODELS``) or when the new model is predicted to take more than 80% of
  the free VRAM while other models of ours are loaded (``(*Scheduler).load``'s pre-flight);
- a model that still does not fit once nothing of ours is left to evict is *not* refused:
  llama-server fits what it can on the GPU and runs the rest on the CPU, so ``/api/ps`` shows
  ``size_vram < size`` (counted in :attr:`OllamaEmulator.cpu_offloads`, a slow model a broker
  should never cause). Only ``options.num_gpu`` > 0 (layers demanded on the GPU) OOMs: 500;
- ``keep_alive`` as ``api.Duration`` parses it (a number is seconds, a string is a Go duration
  with a unit, negative is forever); a request without one keeps the runner's current
  session (``(*LlmRequest).useLoadedRunner``);
- an empty prompt (or ``messages: []``) only loads: ``done_reason: "load"``; with ``keep_alive:
  0`` it answers ``done_reason: "unload"`` at once (``(*Scheduler).expireRunner``), while the
  real unload waits for in-flight requests (``processCompleted``: an expired runner with
  refCount > 0 is retried, never cut) and then takes ``unload_seconds``, the model staying in
  ``/api/ps`` with ``expires_at`` in the past until the unload starts;
- ``/api/ps`` (``(*Scheduler).loadedModels``) never lists a model that is still loading (it
  sits in ``activeLoading``, not ``loaded``) and, while one is being unloaded, answers only
  once the runner is gone (``loadedMu``/``refMu`` are held across the kill);
- the Host allow-list of ``allowedHostsMiddleware`` (on a loopback listener, a Host whose
  name is not an IP of ours, ``localhost``, this host's name or ``*.localhost``/``.local``/
  ``.internal`` gets 403; the port is never looked at) and the CORS Origin allow-list of
  ``envconfig.AllowedOrigins`` (``origins`` = ``OLLAMA_ORIGINS``);
- ``/api/*`` stream NDJSON, ``/v1/*`` stream SSE ending in ``[DONE]``;
- ``GET``/``HEAD /api/version`` answers ``{"version"}`` (routes.go ``GenerateRoutes``), the one
  way to tell an Ollama over HTTP (``gpubroker doctor`` and ``init`` probe it);
- a loaded runner is reused only while the request's runner options match the ones it was
  loaded with (``(*runnerRef).needsReload``): a different ``num_ctx``, ``num_batch``,
  ``num_gpu``... expires it (once its requests end) and loads the model again;
- a model is a fixed footprint (a plain byte count) or a
  :class:`~gpubroker.sim.ollama_models.SimModel`, whose runner takes its weights plus a KV
  cache at the runner's context (:mod:`gpubroker.sim.ollama_models` has the sizing, the
  options and ``/api/show``'s ``model_info``); ``/api/tags`` lists the weights, ``/api/ps``
  the runner's ``size``, ``size_vram`` and ``context_length``.

Each model is allocated on the GPU under owner ``owner`` (default ``"ollama"``) and tag = the
model's full name.

Not reproduced: pull/push/create, the VRAM recovery wait after an unload, the host's own
interface addresses in the Host check, ``OLLAMA_MAX_QUEUE``, ``/v1/responses``,
``/v1/messages`` and ``/v1/audio/transcriptions``.
A test-only option ``options.sim_error_after: N`` ends a stream after N tokens with an
``{"error"}`` line, the way Ollama reports a runner failure mid-stream.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import math
import re
import socket
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import anyio
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gpubroker.sim.gpu import OutOfMemory, SimGPU
from gpubroker.sim.ollama_models import (
    Entry,
    RunnerOptions,
    capabilities,
    default_context,
    footprint,
    model_info,
    needs_reload,
    parameters_text,
    runner_options,
    slots_of,
    weights_of,
)
from gpubroker.sim.service import Changed, EmulatedService
from gpubroker.sim.wire import (
    EVENT_STREAM,
    FOREVER,
    NDJSON,
    SSE_DONE,
    GuardedStream,
    digest_of,
    embedding,
    iso_local,
    iso_utc,
    nanos,
    ndjson_line,
    sse_event,
    tokens,
    unix_now,
    utc_now,
)

VERSION = "0.12.6"
DEFAULT_NUM_PREDICT = 8

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class BadRequest(Exception):
    """A request Ollama would answer with 400."""


class LoadFailed(Exception):
    """The runner could not be started (here: the SimGPU refused the allocation)."""


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from a JSON ``keep_alive``; ``math.inf`` for negative, ``None`` when absent.

    api/types.go: (*Duration).UnmarshalJSON — a JSON number is seconds; a string goes through
    Go's ``time.ParseDuration``, which needs a unit (``"10m"``, ``"1h30m"``; only ``"0"`` may
    go without), so ``"300"`` is a 400; anything else is "Unsupported type".
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("Unsupported type: 'bool'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_go_duration(value)
    else:
        raise BadRequest(f"Unsupported type: '{_go_type(value)}'")
    return math.inf if seconds < 0 else seconds


def _go_type(value: Any) -> str:
    """The Go type name ``json.Unmarshal`` gives a JSON array or object."""
    return "[]interface {}" if isinstance(value, list) else "map[string]interface {}"


def _parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration``: ``[-+]`` then one or more number+unit pairs, or ``0``."""
    sign, body = (-1.0, text[1:]) if text[:1] == "-" else (1.0, text.removeprefix("+"))
    if body == "0":
        return 0.0
    if body == "":
        raise BadRequest(f'time: invalid duration "{text}"')
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos == 0 and re.fullmatch(r"\d+(\.\d*)?|\.\d+", body):
        raise BadRequest(f'time: missing unit in duration "{text}"')
    if pos != len(body):
        raise BadRequest(f'time: invalid duration "{text}"')
    return sign * total


@dataclass(eq=False)
class _Runner:
    """One loaded (or loading, or unloading) model."""

    name: str
    size: int
    session: float
    expires_mono: float
    options: RunnerOptions
    context_length: int
    weights: int
    vram: int = 0
    """Bytes on the GPU: ``size`` unless llama-server had to put layers on the CPU."""
    state: Literal["loading", "loaded", "unloading"] = "loading"
    refcount: int = 0
    load_duration: float = 0.0
    slots: anyio.Semaphore = field(default_factory=lambda: anyio.Semaphore(1))
    """Ollama's ``OLLAMA_NUM_PARALLEL``: how many requests the runner decodes at once."""
    changed: Changed = field(default_factory=Changed)
    gone: anyio.Event = field(default_factory=anyio.Event)


@dataclass(eq=False)
class _Pending:
    """A request waiting for the scheduler to give it a runner."""

    name: str
    keep_alive: float | None
    options: RunnerOptions
    done: anyio.Event = field(default_factory=anyio.Event)
    runner: _Runner | None = None
    error: str | None = None
    abandoned: bool = False
    loaded_now: bool = False


class OllamaEmulator(EmulatedService):
    """Ollama on a :class:`SimGPU`. Serve :attr:`app` (with its lifespan) to use it."""

    def __init__(
        self,
        gpu: SimGPU,
        models: Mapping[str, Entry],
        *,
        load_seconds: float = 0.05,
        unload_seconds: float = 0.02,
        token_interval: float = 0.01,
        max_loaded: int = 3,
        keep_alive: float = 300.0,
        num_parallel: int = 1,
        num_predict: int = DEFAULT_NUM_PREDICT,
        owner: str = "ollama",
        origins: Sequence[str] = (),
        context_length: int = 0,
        kv_cache_type: str = "",
    ) -> None:
        self.origins = tuple(origins)
        """``OLLAMA_ORIGINS``: extra browser origins allowed on top of the loopback ones."""
        self.models: dict[str, Entry] = {_full_name(n): entry for n, entry in models.items()}
        """Model -> a fixed footprint in bytes, or a :class:`SimModel` sized at its context."""
        self.context_length = context_length
        """``OLLAMA_CONTEXT_LENGTH``: the default num_ctx; 0 for the VRAM-tier default."""
        self.kv_cache_type = kv_cache_type
        """``OLLAMA_KV_CACHE_TYPE`` (f16 when empty)."""
        self.load_seconds = load_seconds
        self.unload_seconds = unload_seconds
        self.token_interval = token_interval
        self.max_loaded = max_loaded if max_loaded > 0 else 3
        self.default_keep_alive = math.inf if keep_alive < 0 else keep_alive
        self.num_parallel = max(1, num_parallel)
        self.num_predict = num_predict
        self.loads = 0
        """How many times a model was loaded onto the GPU."""
        self.unloads = 0
        """How many times a model was unloaded from the GPU."""
        self.cpu_offloads = 0
        """Loads that did not fit in free VRAM and ran partly on the CPU: a broker fault."""
        self.reloads = 0
        """Runners expired because a request asked for other runner options (num_ctx...)."""
        self._runners: dict[str, _Runner] = {}
        self._pending: deque[_Pending] = deque()
        self._pending_changed = Changed()
        super().__init__(gpu, owner)

    # -- what tests may inspect -------------------------------------------------------------

    def resident(self) -> dict[str, str]:
        """Model name -> ``"loading" | "loaded" | "unloading"``, as ``/api/ps`` would list."""
        return {name: r.state for name, r in self._runners.items()}

    def in_flight(self, model: str) -> int:
        runner = self._runners.get(_full_name(model))
        return runner.refcount if runner else 0

    # -- scheduler ----------------------------------------------------------------------------

    async def _on_started(self) -> None:
        self._runners.clear()
        self._pending.clear()
        self.spawn(self._scheduler)

    async def _scheduler(self) -> None:
        while True:
            while not self._pending:
                await self._pending_changed.wait()
            pending = self._pending.popleft()
            if not pending.abandoned:
                await self._schedule(pending)

    async def _schedule(self, p: _Pending) -> None:
        while (runner := self._runners.get(p.name)) is not None:
            if runner.state != "unloading":
                if not needs_reload(runner.options, p.options):
                    self._grant(p, runner)
                    return
                # processPending: a runner that needs a reload is expired like a victim and
                # the request waits for it to be gone (after its requests end).
                self.reloads += 1
                self._expire(runner)
            await runner.gone.wait()
        entry = self.models[p.name]
        fp = footprint(entry, p.options, parallel=self.num_parallel, cache_type=self.kv_cache_type)
        await self._make_room(fp.predicted)
        size = fp.total
        session = self._session(p.keep_alive)
        runner = _Runner(
            p.name,
            size,
            session,
            anyio.current_time() + session,
            options=p.options,
            context_length=fp.context_length,
            weights=weights_of(entry),
            slots=anyio.Semaphore(slots_of(entry, self.num_parallel)),
        )
        self._runners[p.name] = runner
        started = anyio.current_time()
        await anyio.sleep(self.load_seconds)
        # server/sched.go: (*Scheduler).load with requireFull=false (nothing of ours is left to
        # evict): llama-server fits the layers it can on the GPU, the rest runs on the CPU.
        # Only layers demanded on the GPU (num_gpu > 0) make the runner die of an OOM.
        num_gpu = p.options.num_gpu if p.options.num_gpu >= 0 else None
        if num_gpu == 0:
            vram = 0
        elif num_gpu is not None or size <= self.gpu.free_bytes:
            vram = size
        else:
            vram = max(0, self.gpu.free_bytes)
        try:
            if vram:
                self.gpu.allocate(self.owner, vram, tag=p.name)
        except OutOfMemory as exc:
            del self._runners[p.name]
            runner.gone.set()
            p.error = f"llama runner process has terminated: {exc}"
            p.done.set()
            return
        if vram < size and num_gpu != 0:
            self.cpu_offloads += 1
        self.loads += 1
        runner.vram = vram
        runner.state = "loaded"
        runner.load_duration = anyio.current_time() - started
        self.spawn(self._expire_when_idle, runner)
        p.loaded_now = True
        self._grant(p, runner)

    def _grant(self, p: _Pending, runner: _Runner) -> None:
        # server/sched.go: (*LlmRequest).useLoadedRunner — only a request that names a
        # keep_alive changes the session; one without keeps what the runner has (even 0).
        if p.keep_alive is not None:
            runner.session = p.keep_alive
        runner.expires_mono = anyio.current_time() + runner.session
        if not p.abandoned:
            runner.refcount += 1
            p.runner = runner
        runner.changed.notify()
        p.done.set()

    async def _make_room(self, size: int) -> None:
        """Unload our own runners until the count limit and free VRAM allow ``size``.

        server/sched.go: (*Scheduler).processPending — at ``OLLAMA_MAX_LOADED_MODELS`` it
        evicts ``findRunnerToUnload`` (idle first, shortest session, then name); with other
        models loaded, ``load``'s pre-flight evicts when the prediction exceeds 80% of free.
        """
        while self._runners:
            too_many = len(self._runners) >= self.max_loaded
            too_big = size > self.gpu.free_bytes * 0.8
            if not (too_many or too_big):
                return
            unloading = [r for r in self._runners.values() if r.state == "unloading"]
            if unloading:
                await unloading[0].gone.wait()
                continue
            idle = [r for r in self._runners.values() if r.refcount == 0]
            candidates = idle or list(self._runners.values())
            victim = min(candidates, key=lambda r: (r.session, r.name))
            self._expire(victim)
            await victim.gone.wait()

    async def _expire_when_idle(self, runner: _Runner) -> None:
        while True:
            if runner.refcount == 0:
                remaining = runner.expires_mono - anyio.current_time()
                if remaining <= 0:
                    break
                with anyio.move_on_after(None if math.isinf(remaining) else remaining):
                    await runner.changed.wait()
            else:
                await runner.changed.wait()
        # processCompleted's expiredCh case: the runner is killed (runner.unload() waits for
        # the process to exit, which frees its VRAM) and only then leaves s.loaded.
        runner.state = "unloading"
        await anyio.sleep(self.unload_seconds)
        self.gpu.free(self.owner, tag=runner.name)
        self.unloads += 1
        if self._runners.get(runner.name) is runner:
            del self._runners[runner.name]
        runner.gone.set()

    def _expire(self, runner: _Runner) -> None:
        """Ollama's ``expireRunner``: unload as soon as the runner is idle."""
        if runner.state == "unloading":
            return
        runner.session = 0.0
        runner.expires_mono = anyio.current_time()
        runner.changed.notify()

    def _session(self, keep_alive: float | None) -> float:
        return self.default_keep_alive if keep_alive is None else keep_alive

    def _options(self, name: str, options: Any = None) -> RunnerOptions:
        """The runner options a request with ``options`` asks for (server/routes.go
        modelOptions); ``options`` that are not an object count as none."""
        return runner_options(
            self.models[name],
            options if isinstance(options, dict) else {},
            default_ctx=default_context(self.gpu.total, self.context_length),
            parallel=self.num_parallel,
        )

    async def _acquire(self, name: str, keep_alive: float | None, options: Any = None) -> _Pending:
        """Queue for the scheduler; return the granted pending request (runner held)."""
        p = _Pending(name, keep_alive, self._options(name, options))
        self.require_running()
        self._pending.append(p)
        self._pending_changed.notify()
        try:
            await p.done.wait()
        except BaseException:
            p.abandoned = True
            if p.runner is not None:
                self._release(p.runner)
            raise
        if p.error is not None:
            raise LoadFailed(p.error)
        return p

    async def _take_slot(self, runner: _Runner) -> Callable[[], None]:
        """Wait for one of the runner's parallel slots; returns what gives it (and the ref) back."""
        try:
            await runner.slots.acquire()
        except BaseException:
            self._release(runner)
            raise

        def done() -> None:
            runner.slots.release()
            self._release(runner)

        return done

    def _release(self, runner: _Runner) -> None:
        runner.refcount -= 1
        if runner.refcount == 0:
            runner.expires_mono = anyio.current_time() + runner.session
            runner.changed.notify()

    # -- HTTP ---------------------------------------------------------------------------------

    def _middleware(self) -> Sequence[Middleware]:
        return [Middleware(_AccessGuard, origins=lambda: self.origins)]

    def _routes(self) -> Sequence[BaseRoute]:
        return [
            Route("/", self._root, methods=["GET", "HEAD"]),
            Route("/api/version", self._version, methods=["GET", "HEAD"]),
            Route("/api/tags", self._tags, methods=["GET", "HEAD"]),
            Route("/api/ps", self._ps, methods=["GET"]),
            Route("/api/show", self._show, methods=["POST"]),
            Route("/api/generate", self._generate, methods=["POST"]),
            Route("/api/chat", self._chat, methods=["POST"]),
            Route("/api/embed", self._embed, methods=["POST"]),
            Route("/api/embeddings", self._embeddings, methods=["POST"]),
            Route("/v1/models", self._v1_models, methods=["GET"]),
            Route("/v1/chat/completions", self._v1_chat, methods=["POST"]),
            Route("/v1/completions", self._v1_completions, methods=["POST"]),
            Route("/v1/embeddings", self._v1_embeddings, methods=["POST"]),
        ]

    async def _root(self, _request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def _version(self, _request: Request) -> Response:
        return JSONResponse({"version": VERSION})

    async def _tags(self, _request: Request) -> Response:
        modified = iso_local(utc_now())
        return JSONResponse(
            {
                "models": [
                    {
                        "name": name,
                        "model": name,
                        "modified_at": modified,
                        "size": weights_of(entry),
                        "digest": digest_of(name),
                        "details": _details(weights_of(entry)),
                    }
                    for name, entry in sorted(self.models.items())
                ]
            }
        )

    async def _ps(self, _request: Request) -> Response:
        # server/sched.go: (*Scheduler).loadedModels — a model being unloaded holds loadedMu
        # and its refMu across the kill, so ps answers once it is gone; a model still loading
        # is in activeLoading, not in s.loaded, so it is not listed at all.
        while unloading := [r for r in self._runners.values() if r.state == "unloading"]:
            await unloading[0].gone.wait()
        now_mono, now = anyio.current_time(), utc_now()
        entries: list[tuple[float, dict[str, object]]] = []
        for name, r in self._runners.items():
            if r.state != "loaded":
                continue
            left = r.expires_mono - now_mono
            expires = now + FOREVER if math.isinf(left) else now + timedelta(seconds=left)
            entries.append((left, {
                    "name": name,
                    "model": name,
                    "size": r.size,
                    "digest": digest_of(name),
                    "details": _details(r.weights),
                    "expires_at": iso_local(expires),
                    "size_vram": r.vram,
                    "context_length": r.context_length,
                }))  # fmt: skip
        # server/routes.go: (*Server).PsHandler — longest time left first.
        entries.sort(key=lambda e: e[0], reverse=True)
        return JSONResponse({"models": [entry for _, entry in entries]})

    async def _show(self, request: Request) -> Response:
        body, error = await _body(request)
        if error is not None:
            return error
        name = self._resolve(body.get("model") or body.get("name"))
        if isinstance(name, Response):
            return name
        entry = self.models[name]
        return JSONResponse(
            {
                "license": "",
                "modelfile": f"FROM {name}\n",
                "parameters": parameters_text(entry),
                "template": "{{ .Prompt }}",
                "details": _details(weights_of(entry)),
                "model_info": model_info(entry),
                "capabilities": capabilities(entry),
                "modified_at": iso_local(utc_now()),
            }
        )

    def _resolve(self, model: Any) -> str | Response:
        if not isinstance(model, str) or not model:
            return JSONResponse({"error": "model is required"}, status_code=400)
        name = _full_name(model)
        if name not in self.models:
            return JSONResponse({"error": f"model '{model}' not found"}, status_code=404)
        return name

    async def _generate(self, request: Request) -> Response:
        return await self._native(request, chat=False)

    async def _chat(self, request: Request) -> Response:
        return await self._native(request, chat=True)

    async def _native(self, request: Request, *, chat: bool) -> Response:
        body, error = await _body(request)
        if error is not None:
            return error
        name = self._resolve(body.get("model"))
        if isinstance(name, Response):
            return name
        model = body["model"]
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"))
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        empty = not body.get("messages") if chat else not body.get("prompt")
        # server/routes.go: GenerateHandler / ChatHandler — "expire the runner if unload is
        # requested (empty prompt, keep alive is 0)", checked after the model lookup (404).
        if empty and keep_alive == 0:
            if (runner := self._runners.get(name)) is not None:
                self._expire(runner)
            return JSONResponse(_native_done(model, chat, "unload"))
        options = body.get("options")
        options = options if isinstance(options, dict) else {}
        try:
            p = await self._acquire(name, keep_alive, options)
        except LoadFailed as exc:
            return JSONResponse({"error": str(exc)}, status_code=500)
        assert p.runner is not None
        runner = p.runner
        if empty:
            self._release(runner)
            return JSONResponse(_native_done(model, chat, "load"))
        count = _positive(options.get("num_predict"), self.num_predict)
        fail_after = options.get("sim_error_after")
        load_ns = nanos(runner.load_duration) if p.loaded_now else 0

        def chunk(text: str) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "created_at": iso_utc()}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            out["done"] = False
            return out

        def final(text: str, started: float) -> dict[str, Any]:
            out = chunk(text)
            took = anyio.current_time() - started
            out.update(done=True, done_reason="stop")
            if not chat:
                out["context"] = [1, 2, 3]
            out.update(
                total_duration=nanos(took) + load_ns,
                prompt_eval_count=3,
                prompt_eval_duration=nanos(self.token_interval),
                eval_count=count,
                eval_duration=nanos(took),
            )
            if load_ns:
                out["load_duration"] = load_ns
            return out

        done = await self._take_slot(runner)

        if body.get("stream") is False:
            try:
                started = anyio.current_time()
                await anyio.sleep(self.token_interval * count)
                return JSONResponse(final("".join(tokens(count)), started))
            finally:
                done()

        async def stream() -> AsyncIterator[bytes]:
            started = anyio.current_time()
            for i, word in enumerate(tokens(count)):
                if fail_after is not None and i >= int(fail_after):
                    yield ndjson_line({"error": "an error was encountered while running the model"})
                    return
                await anyio.sleep(self.token_interval)
                yield ndjson_line(chunk(word))
            yield ndjson_line(final("", started))

        return GuardedStream(stream(), on_close=done, media_type=NDJSON)

    async def _embed(self, request: Request) -> Response:
        body, error = await _body(request)
        if error is not None:
            return error
        name = self._resolve(body.get("model"))
        if isinstance(name, Response):
            return name
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else list(raw or [])
        inputs = [text for text in inputs if text]
        result = await self._embed_texts(
            name, body.get("keep_alive"), inputs, options=body.get("options")
        )
        if isinstance(result, Response):
            return result
        return JSONResponse(
            {
                "model": body["model"],
                "embeddings": result,
                "total_duration": nanos(self.token_interval),
                "prompt_eval_count": len(inputs),
            }
        )

    async def _embeddings(self, request: Request) -> Response:
        body, error = await _body(request)
        if error is not None:
            return error
        name = self._resolve(body.get("model"))
        if isinstance(name, Response):
            return name
        prompt = body.get("prompt") or ""
        result = await self._embed_texts(
            name, body.get("keep_alive"), [prompt] if prompt else [], options=body.get("options")
        )
        if isinstance(result, Response):
            return result
        return JSONResponse({"embedding": result[0] if result else []})

    async def _embed_texts(
        self,
        name: str,
        keep_alive_raw: Any,
        inputs: list[str],
        error: Callable[[int, str], Response] | None = None,
        options: Any = None,
    ) -> list[list[float]] | Response:
        error = error or (lambda status, msg: JSONResponse({"error": msg}, status_code=status))
        try:
            keep_alive = parse_keep_alive(keep_alive_raw)
            p = await self._acquire(name, keep_alive, options)
        except BadRequest as exc:
            return error(400, str(exc))
        except LoadFailed as exc:
            return error(500, str(exc))
        assert p.runner is not None
        try:
            if inputs:
                async with p.runner.slots:
                    await anyio.sleep(self.token_interval)
            return [embedding(text) for text in inputs]
        finally:
            self._release(p.runner)

    # -- OpenAI-compatible routes ----------------------------------------------------------------

    async def _v1_models(self, _request: Request) -> Response:
        created = unix_now()
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": created, "owned_by": "library"}
                    for name in sorted(self.models)
                ],
            }
        )

    async def _v1_chat(self, request: Request) -> Response:
        return await self._openai(request, chat=True)

    async def _v1_completions(self, request: Request) -> Response:
        return await self._openai(request, chat=False)

    async def _v1_prepare(self, request: Request) -> tuple[dict[str, Any], str] | Response:
        body, error = await _body(request)
        if error is not None:
            return _openai_error(400, "invalid request body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _openai_error(400, "model is required")
        name = _full_name(model)
        if name not in self.models:
            return _openai_error(404, f'model "{model}" not found, try pulling it first')
        return body, name

    async def _openai(self, request: Request, *, chat: bool) -> Response:
        prepared = await self._v1_prepare(request)
        if isinstance(prepared, Response):
            return prepared
        body, name = prepared
        model = body["model"]
        try:
            p = await self._acquire(name, parse_keep_alive(body.get("keep_alive")))
        except BadRequest as exc:
            return _openai_error(400, str(exc))
        except LoadFailed as exc:
            return _openai_error(500, str(exc))
        assert p.runner is not None
        runner = p.runner
        requested = body.get("max_completion_tokens") or body.get("max_tokens")
        count = _positive(requested, self.num_predict)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:8]}"
        created = unix_now()
        kind = "chat.completion" if chat else "text_completion"
        usage = {"prompt_tokens": 3, "completion_tokens": count, "total_tokens": 3 + count}

        def choice(text: str, finish: str | None, *, stream: bool) -> dict[str, Any]:
            if not chat:
                return {"text": text, "index": 0, "finish_reason": finish}
            key = "delta" if stream else "message"
            return {
                "index": 0,
                key: {"role": "assistant", "content": text},
                "finish_reason": finish,
            }

        def envelope(choices: list[dict[str, Any]], *, stream: bool) -> dict[str, Any]:
            obj = f"{kind}.chunk" if stream and chat else kind
            return {
                "id": ident,
                "object": obj,
                "created": created,
                "model": model,
                "system_fingerprint": "fp_ollama",
                "choices": choices,
            }

        done = await self._take_slot(runner)

        if not body.get("stream"):
            try:
                await anyio.sleep(self.token_interval * count)
                out = envelope([choice("".join(tokens(count)), "stop", stream=False)], stream=False)
                out["usage"] = usage
                return JSONResponse(out)
            finally:
                done()

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def stream() -> AsyncIterator[bytes]:
            for word in tokens(count):
                await anyio.sleep(self.token_interval)
                yield sse_event(envelope([choice(word, None, stream=True)], stream=True))
            yield sse_event(envelope([choice("", "stop", stream=True)], stream=True))
            if include_usage:
                yield sse_event({**envelope([], stream=True), "usage": usage})
            yield SSE_DONE

        return GuardedStream(stream(), on_close=done, media_type=EVENT_STREAM)

    async def _v1_embeddings(self, request: Request) -> Response:
        prepared = await self._v1_prepare(request)
        if isinstance(prepared, Response):
            return prepared
        body, name = prepared
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else [str(x) for x in raw or []]
        result = await self._embed_texts(name, body.get("keep_alive"), inputs, _openai_error)
        if isinstance(result, Response):
            return result
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "embedding": vec, "index": i}
                    for i, vec in enumerate(result)
                ],
                "model": body["model"],
                "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
            }
        )


def _positive(value: Any, default: int) -> int:
    """A token count from a request; Ollama's ``-1`` (no limit) and junk fall back to default."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        return default
    return count if count > 0 else default


def _full_name(model: str) -> str:
    return model if ":" in model else f"{model}:latest"


def _details(size: int) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": f"{size / 0.6e9:.1f}B",
        "quantization_level": "Q4_K_M",
    }


def _native_done(model: str, chat: bool, reason: str) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "created_at": iso_utc()}
    if chat:
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update(done=True, done_reason=reason)
    return out


def _openai_error(status: int, message: str) -> Response:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": None}},
        status_code=status,
    )


async def _body(request: Request) -> tuple[dict[str, Any], Response | None]:
    try:
        body = await request.json()
    except ValueError:
        return {}, JSONResponse({"error": "invalid JSON body"}, status_code=400)
    if not isinstance(body, dict):
        return {}, JSONResponse({"error": "request body must be a JSON object"}, status_code=400)
    return body, None


_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_BROWSER_EXTENSIONS = ("chrome-extension://", "safari-extension://", "moz-extension://")
# envconfig/config.go: AllowedOrigins — these come on top of OLLAMA_ORIGINS.
_DEFAULT_ORIGINS = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for port in ("", ":*")
        for scheme in ("http", "https")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)


def _split_host_port(host: str) -> str:
    """Go's ``net.SplitHostPort`` host part, or the whole value where Go reports an error."""
    if host.startswith("["):
        end = host.find("]")
        if end > 0 and host[end + 1 : end + 2] == ":":
            return host[1:end]
        return host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _allowed_host(host: str) -> bool:
    """server/routes.go: allowedHost — by name alone; the port plays no part."""
    host = host.lower()
    if host in ("", "localhost") or host == socket.gethostname().lower():
        return True
    return host.endswith(_LOCAL_SUFFIXES)


def _allowed_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    private = any(ip in net for net in _PRIVATE if net.version == ip.version)
    return ip.is_loopback or ip.is_unspecified or private


class _AccessGuard:
    """Ollama's two gates in front of every route, in its order.

    1. gin-contrib/cors with ``envconfig.AllowedOrigins``: a request with an ``Origin`` that is
       neither its own Host (same origin) nor allowed gets 403; an allowed preflight gets 204.
    2. server/routes.go: allowedHostsMiddleware — only on a loopback listener: a Host that is
       not a loopback/private/unspecified IP and not an allowed name gets 403 (empty body).
    """

    def __init__(self, app: ASGIApp, origins: Callable[[], Sequence[str]]) -> None:
        self.app = app
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get(b"host", "")
        origin = headers.get(b"origin", "")
        method = scope["method"]
        if origin and origin not in (f"http://{host}", f"https://{host}"):
            if not self._origin_allowed(origin):
                await _bare(send, 403)
                return
            if method == "OPTIONS":
                await _bare(send, 204)
                return
        server = scope.get("server")
        if server and _loopback_listener(server[0]):
            name = _split_host_port(host)
            if not _allowed_ip(name):
                if not _allowed_host(name):
                    await _bare(send, 403)
                    return
                if method == "OPTIONS":
                    await _bare(send, 204)
                    return
        await self.app(scope, receive, send)

    def _origin_allowed(self, origin: str) -> bool:
        if origin.startswith(_BROWSER_EXTENSIONS):
            return True
        patterns = (*self.origins(), *_DEFAULT_ORIGINS)
        return any(origin == p or ("*" in p and fnmatch.fnmatchcase(origin, p)) for p in patterns)


def _loopback_listener(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return True  # Go: an address it cannot parse falls through to the Host check


async def _bare(send: Send, status: int) -> None:
    """gin's ``AbortWithStatus``: a status and no body."""
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})
