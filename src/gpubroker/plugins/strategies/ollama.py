"""The ``ollama`` strategy: frees the whole backend, or one model, and sizes each request.

Ollama loads and frees models one by one, so it is a ``per_model`` strategy: the broker may
evict one model and keep another. Facts read at Ollama v0.33.0-rc2 (commit fb30760); the
sizing itself is :mod:`~gpubroker.plugins.strategies.ollama_sizing`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpubroker.errors import StrategyFailed
from gpubroker.plugins.strategies import ollama_sizing as sizing
from gpubroker.plugins.strategies.base import Demand, Strategy, StrategyContext
from gpubroker.plugins.strategies.calls import json_call as _json
from gpubroker.plugins.strategies.calls import poll_until

log = logging.getLogger("gpubroker.plugins.strategies")

# The POST routes that schedule a runner (plugins/classifiers/builtin.py: OllamaClassifier)
# and carry the model in a JSON body's "model". Only the native ones read "options"; the
# OpenAI and Anthropic layers (openai/openai.go, middleware/) never set num_ctx.
NATIVE_ROUTES = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"})
COMPAT_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    }
)

# types/model/name.go: DefaultName — what ParseName fills in for a part left out.
_DEFAULT_HOST, _DEFAULT_NAMESPACE, _DEFAULT_TAG = "registry.ollama.ai", "library", "latest"
_ZERO_DURATION = re.compile(r"[-+]?(?:(?:0+(?:\.0*)?|\.0+)(?:ns|us|µs|ms|s|m|h))+|[-+]?0")


def canonical_model(name: Any) -> str | None:
    """The name Ollama shows for ``name`` (in ``/api/ps``, its scheduler's key), or None.

    types/model/name.go: ParseName (a tag only after the last "/", then model, namespace,
    host from the right; defaults ``registry.ollama.ai/library/…:latest``) and
    DisplayShortest (the default host, then the default namespace, left out). Case is kept:
    Ollama matches names case-insensitively (server/images.go getExistingName).
    """
    if not isinstance(name, str) or not name.strip():
        return None
    rest, tag = name.strip(), _DEFAULT_TAG
    if rest.rfind(":") > rest.rfind("/"):
        rest, _, tag = rest.rpartition(":")
    parts = rest.split("/")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else _DEFAULT_NAMESPACE
    host = "/".join(parts[:-2]) if len(parts) >= 3 else _DEFAULT_HOST
    host = host.split("://", 1)[-1]
    if not (model and tag and namespace and host):
        return None
    if host.lower() != _DEFAULT_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace.lower() != _DEFAULT_NAMESPACE:
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


def _is_zero_keep_alive(value: Any) -> bool:
    """api/types.go Duration: a JSON number of seconds, or a Go duration string, equal to 0."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    return isinstance(value, str) and _ZERO_DURATION.fullmatch(value.strip()) is not None


NOTHING = Demand(need=0)
"""A request Ollama answers without loading anything (a bad body, no model, a model it lacks)."""


def _go_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's fields as Ollama's decoder sees them: Go's encoding/json matches a key
    to a field case-insensitively and the last one wins, so ``{"Prompt": "hi"}`` is a prompt.
    Keys are folded to lower case here; every field we read is lower case."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        out[key.casefold()] = value
    return out


def unloads_only(path: str, body: Mapping[str, Any]) -> bool:
    """server/routes.go GenerateHandler / ChatHandler: an empty prompt (no messages) with
    keep_alive 0 expires the runner and answers ``done_reason: "unload"``, loading nothing."""
    if "keep_alive" not in body or not _is_zero_keep_alive(body["keep_alive"]):
        return False
    if path == "/api/generate":
        return not body.get("prompt")
    if path == "/api/chat":
        return not body.get("messages")
    return False


def _option_uint(options: Mapping[str, Any], key: str) -> int | None:
    # api/types.go (*Options).FromMap: an int field takes a JSON number (a float is cut).
    value = options.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return max(int(value), 0)


_PARAMETER = re.compile(r"^(\w+)\s+(.*)$")


def modelfile_options(parameters: Any) -> dict[str, str]:
    """The Modelfile's PARAMETERs from ``/api/show``'s ``parameters`` text, by name.

    server/routes.go GetModelInfo writes one ``%-30s %#v`` line per value (a list, one line
    per item); the last line of a name wins here, which is right for the numbers we read.
    """
    out: dict[str, str] = {}
    if isinstance(parameters, str):
        for line in parameters.splitlines():
            if match := _PARAMETER.match(line.strip()):
                out[match.group(1)] = match.group(2).strip()
    return out


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What sizing a model needs, read once from ``/api/tags`` and ``/api/show``."""

    name: str
    """The canonical name in Ollama's own spelling (from ``/api/tags``), so one model is one
    unit whatever case a client wrote it in."""
    weights: int
    model_info: Mapping[str, Any]
    num_ctx: int | None = None
    """The Modelfile's ``PARAMETER num_ctx``, None when it sets none."""
    num_batch: int | None = None
    completion: bool = True
    vision: bool = False
    family: str = ""
    remote: bool = False
    """A cloud model: Ollama forwards it, nothing of it is on this GPU."""


class OllamaStrategy(Strategy):
    """Unload every model in ``/api/ps`` with ``keep_alive: 0``, then wait until ps is empty.

    Ollama replies to ``keep_alive: 0`` at once but unloads only after its running requests end
    (server/sched.go: expireRunner, processCompleted), so the reply proves nothing: ``/api/ps``
    is the confirmation; a runner being killed keeps ps from answering until it is gone. A
    model that is still *loading* is not in ps at all (it sits in the scheduler's
    ``activeLoading``), so ps cannot confirm that nothing is on its way in: the broker's
    telemetry check after an unload is what catches that.

    Model by model: :meth:`unload_model` frees one model the same way, :meth:`loaded_models`
    reads ``size_vram`` from ps, and :meth:`demand` sizes a request (see there).

    Ollama's settings (``OLLAMA_NUM_PARALLEL``, ``OLLAMA_KV_CACHE_TYPE``,
    ``OLLAMA_CONTEXT_LENGTH``, ``OLLAMA_GPU_OVERHEAD``) are the service's environment, not
    ours: they are read from the backend's ``env`` when gpubroker runs it (``command:``),
    else Ollama's defaults are assumed (one slot, f16 cache, the VRAM-tier context).
    """

    name = "ollama"
    description = "Ollama: keep_alive 0 for each loaded model, confirmed through /api/ps"
    # server/routes.go allowedHostsMiddleware: on a loopback listener Ollama answers 403 to a
    # Host *name* other than localhost, its hostname or *.local/.internal/.localhost, so a
    # client that reached the broker by DNS name would be refused; its Origin check (CORS)
    # still sees the browser's Origin, exactly as it would directly.
    host_header = "upstream"
    per_model = True

    def model_key(self, name: str) -> str:
        return canonical_model(name) or name

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self.gpu_total: int | None = ctx.gpu_memory
        """Total bytes of the GPUs Ollama sees, for its VRAM-tier default context (from the
        context: telemetry or the config's ``gpus:``). None: unknown."""
        self._facts: dict[str, ModelFacts] = {}  # by casefolded canonical name
        self._tags: dict[str, tuple[str, int]] = {}  # casefolded -> (stored name, size)

    @property
    def service_env(self) -> Mapping[str, str]:
        """Ollama's own environment where we know it (a managed worker), else empty."""
        return self.backend.env if self.backend.command else {}

    # -- the whole backend ----------------------------------------------------------------

    async def _ps(self) -> list[dict[str, Any]]:
        data = await _json(self.client, "GET", "/api/ps")
        models = (data or {}).get("models") or []
        return [m for m in models if isinstance(m, dict)]

    async def _loaded(self) -> list[str]:
        return [m.get("name") or m.get("model") or "" for m in await self._ps()]

    async def unload(self) -> None:
        models = await self._loaded()
        for model in models:
            await _json(
                self.client, "POST", "/api/generate", json={"model": model, "keep_alive": 0}
            )

        async def gone() -> bool:
            return not await self._loaded()

        await poll_until(gone)

    async def resident(self) -> bool | None:
        return bool(await self._loaded())

    # -- model by model -------------------------------------------------------------------

    async def loaded_models(self) -> dict[str, int]:
        """Model (as ps names it) -> ``size_vram``: its bytes on the GPU (server/routes.go
        PsHandler, llama-server's buffers as it logged them; not its CUDA context)."""
        out: dict[str, int] = {}
        for m in await self._ps():
            name = m.get("name") or m.get("model")
            size = m.get("size_vram")
            if isinstance(name, str) and isinstance(size, int) and not isinstance(size, bool):
                out[name] = size
        return out

    async def _is_loaded(self, model: str) -> bool:
        key = model.casefold()
        return any((canonical_model(n) or "").casefold() == key for n in await self._loaded())

    async def load_model(self, model: str) -> None:
        """Load ``model`` now (``preload:``): a generate request with no prompt only loads the
        model and answers ``done_reason: "load"`` once its runner is up (Ollama's
        ``server/routes.go`` ``GenerateHandler``, the empty-prompt case). Unbounded here: the
        broker bounds a load by the backend's ``startTimeout``."""
        name = canonical_model(model) or model
        body = {"model": name, "stream": False}
        reply = await self.client.post("/api/generate", json=body, timeout=None)
        if reply.status_code == 404:
            raise StrategyFailed(f"Ollama does not know model {name!r} (404)")
        if reply.status_code >= 400:
            raise StrategyFailed(
                f"POST /api/generate answered {reply.status_code}: {reply.text[:200]}"
            )

    async def unload_model(self, model: str) -> None:
        """``keep_alive: 0`` for ``model`` only, then wait until ps no longer lists it.

        The others stay loaded. A name Ollama does not know (404) is done when ps does not
        list it either; one ps still lists (deleted while loaded) cannot be unloaded early.
        """
        name = canonical_model(model) or model
        reply = await self.client.post("/api/generate", json={"model": name, "keep_alive": 0})
        if reply.status_code == 404:
            if await self._is_loaded(name):
                raise StrategyFailed(
                    f"{name} is loaded but Ollama no longer knows it (404): it stays until "
                    "its keep_alive runs out"
                )
            return
        if reply.status_code >= 400:
            raise StrategyFailed(
                f"POST /api/generate answered {reply.status_code}: {reply.text[:200]}"
            )

        async def gone() -> bool:
            return not await self._is_loaded(name)

        await poll_until(gone)

    # -- what a request asks ----------------------------------------------------------------

    async def demand(self, method: str, path: str, body: bytes) -> Demand | None:
        """The model a request names and the bytes it needs on the GPU at its context.

        None for what is not a model request (another route, bad JSON, no model). ``need``:
        :func:`~gpubroker.plugins.strategies.ollama_sizing.model_need` at the request's
        num_ctx (native routes' ``options``; else the Modelfile's, ``OLLAMA_CONTEXT_LENGTH``,
        the VRAM tier of :attr:`gpu_total`, the context of the model's loaded runner, or at
        worst the largest tier), with weights from ``/api/tags`` and the shape from
        ``/api/show``, both read once per model. None when those cannot be read or do not say
        enough to size the cache. 0 for a request that loads nothing: an unload
        (empty prompt, keep_alive 0) or a cloud model.
        """
        if method.upper() != "POST":
            return None
        path = path.split("?", 1)[0]
        if path not in NATIVE_ROUTES and path not in COMPAT_ROUTES:
            return None
        try:
            data = json.loads(body, object_pairs_hook=_go_fields)
        except (ValueError, UnicodeDecodeError):
            return NOTHING  # Ollama answers 400 and loads nothing
        if not isinstance(data, dict):
            return NOTHING
        name = canonical_model(data.get("model"))
        if name is None:
            return NOTHING  # "model is required": 400, nothing loaded
        options = data.get("options") if path in NATIVE_ROUTES else None
        options = options if isinstance(options, dict) else {}
        if unloads_only(path, data):
            return Demand(model=name, need=0)
        try:
            facts = await self._facts_for(name)
            if facts is None:
                return NOTHING  # not installed: Ollama answers 404 and loads nothing
            return Demand(model=facts.name, need=await self._need(facts, options))
        except Exception as exc:  # a lookup that failed leaves the size unknown, nothing more
            log.debug("%s: cannot size %s: %s", self.backend.name, name, exc)
            return Demand(model=name)

    async def _need(self, facts: ModelFacts, options: Mapping[str, Any]) -> int | None:
        if facts.remote:
            return 0
        env = self.service_env
        num_ctx = _option_uint(options, "num_ctx") or facts.num_ctx
        if num_ctx is None:
            num_ctx = sizing.default_num_ctx(self.gpu_total, env)
        if num_ctx is None:
            num_ctx = await self._loaded_context(facts.name) or sizing.LARGEST_DEFAULT_CTX
        if facts.vision:
            num_ctx = max(num_ctx, sizing.VISION_MIN_NUM_CTX)
        parallel = sizing.num_parallel(env, completion=facts.completion, family=facts.family)
        cache = sizing.cache_type(env)
        batch = _option_uint(options, "num_batch") or facts.num_batch
        if sizing.kv_cache_bytes(facts.model_info, num_ctx, parallel, cache) is None:
            return None
        return sizing.model_need(
            facts.weights,
            facts.model_info,
            num_ctx,
            parallel,
            cache,
            completion=facts.completion,
            batch=batch,
        )

    async def _loaded_context(self, model: str) -> int | None:
        """The context of the model's runner, which an automatic-context request reuses
        (server/sched.go needsReload keeps an automatic num_ctx when both are automatic)."""
        for m in await self._ps():
            name = canonical_model(m.get("name") or m.get("model"))
            ctx = m.get("context_length")
            if name and name.casefold() == model.casefold() and isinstance(ctx, int) and ctx > 0:
                return ctx
        return None

    async def _facts_for(self, name: str) -> ModelFacts | None:
        """The model's facts, cached for this strategy's lifetime; None: not installed."""
        key = name.casefold()
        if key in self._facts:
            return self._facts[key]
        if key not in self._tags:
            await self._read_tags()  # a model pulled since the last read
        if key not in self._tags:
            return None
        stored, size = self._tags[key]
        show = await _json(self.client, "POST", "/api/show", json={"model": stored})
        facts = _facts(stored, size, show if isinstance(show, dict) else {})
        self._facts[key] = facts
        return facts

    async def _read_tags(self) -> None:
        data = await _json(self.client, "GET", "/api/tags")
        for m in (data or {}).get("models") or []:
            if not isinstance(m, dict):
                continue
            stored = canonical_model(m.get("name") or m.get("model"))
            size = m.get("size")
            if stored and isinstance(size, int) and not isinstance(size, bool):
                self._tags[stored.casefold()] = (stored, size)


def _facts(stored: str, size: int, show: Mapping[str, Any]) -> ModelFacts:
    info = show.get("model_info")
    info = info if isinstance(info, dict) else {}
    caps = show.get("capabilities")
    caps = [c for c in caps if isinstance(c, str)] if isinstance(caps, list) else []
    details = show.get("details")
    details = details if isinstance(details, dict) else {}
    params = modelfile_options(show.get("parameters"))
    return ModelFacts(
        name=stored,
        weights=size,
        model_info=info,
        num_ctx=_int_text(params.get("num_ctx")),
        num_batch=_int_text(params.get("num_batch")),
        # server/sched.go load: a model without the completion capability runs one slot;
        # an old Ollama that lists no capabilities is taken as a completion model.
        completion=not caps or "completion" in caps,
        vision="vision" in caps,
        family=str(details.get("family") or sizing.architecture(info) or ""),
        remote=bool(show.get("remote_host")),
    )


def _int_text(text: str | None) -> int | None:
    try:
        value = int(float(text)) if text else None
    except ValueError:
        return None
    return value if value is not None and value > 0 else None
