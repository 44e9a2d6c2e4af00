"""What a resolved config is: frozen, typed objects every subsystem reads.

``Config`` holds the top-level settings and its ``BackendConfig`` backends (and declared
``GpuSpec`` GPUs); the defaults here are gpubroker's. Parsing and validating a file into these
is :mod:`~gpubroker.config.load`'s work, key by key with :mod:`~gpubroker.config.keys`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from gpubroker.config.keys import BACKEND_KEYS, TOP_KEYS, Field
from gpubroker.errors import ConfigError

Policy = Literal["exclusive", "budget"]
Restart = Literal["on-failure", "always", "never"]
HostHeader = Literal["client", "upstream"]
Progress = Literal["comments", "off"]

DEFAULT_STATUS_PORT = 5102
DEFAULT_QUEUE_TIMEOUT = 120.0
HIDDEN_KEY = "(hidden)"  # what ``serve --check`` shows for an API key written in the file
DEFAULT_API_BODY_LIMIT = 64 * 2**20  # room for base64 images in a chat request


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """A GPU declared in the config: ``id`` is an index or a UUID; sizes in bytes."""

    id: int | str
    memory: int | None = None
    reserve: int = 0


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A caller the api port knows: a Bearer ``key`` named ``name`` (the name is what status,
    events and metrics show; the key never leaves this object, not even in its repr).
    ``models``: the model names (or aliases) it may use; None for all. ``env``: the variable
    the key was read from (``key: env:VAR``), which ``serve --check`` shows instead."""

    name: str
    key: str = field(repr=False)
    models: tuple[str, ...] | None = None
    env: str | None = None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model a backend serves, as ``models:`` declares it (the api port routes by these).

    ``aliases`` are other names clients may ask for; ``upstream_model`` is the name sent
    upstream in place of whatever name matched (None: the name asked for); ``vram`` in bytes.
    ``pinned`` and ``exclusive_with`` are the residency rules of the model's own unit
    (``backend/model``, under ``policy: budget``); ``exclusive_with`` holds names as written,
    each a backend or a model some backend declares (:mod:`~gpubroker.config.rules`).
    """

    name: str
    aliases: tuple[str, ...] = ()
    upstream_model: str | None = None
    vram: int | None = None
    pinned: bool = False
    exclusive_with: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One GPU service behind the broker."""

    name: str
    proxy_port: int
    upstream: str
    unload_strategy: str = "generic"
    unload_endpoint: str | None = None
    load_endpoint: str | None = None
    classifier: str | None = None
    vram: int | None = None
    priority: int = 0
    pinned: bool = False
    exclusive_with: tuple[str, ...] = ()
    """Backends, or models some backend declares, never resident beside this one (either
    side naming the other is enough); checked by :mod:`~gpubroker.config.rules`."""
    gpu: tuple[int | str, ...] = ()
    gpu_paths: tuple[str, ...] | None = None
    sleep_level: int = 1
    max_concurrency: int | None = None
    health_path: str | None = None
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    idle_timeout: float | None = None
    start_timeout: float = 120.0
    stop_timeout: float = 10.0
    autostart: bool = False
    restart: Restart = "on-failure"
    log_file: str | None = None
    host_header: HostHeader | None = None
    """``client``: forward the client's Host (a transparent proxy); ``upstream``: send the
    upstream's own host instead (virtual hosts, TLS with SNI). None: the strategy's default
    (``Strategy.host_header``)."""
    upstream_idle_timeout: float | None = None  # None: the top-level upstreamIdleTimeout
    models: tuple[ModelSpec, ...] | None = None  # None: discovered from the service itself
    progress: Progress = "off"
    """``comments``: a streaming request that has to wait for the GPU gets its response head
    at once and an SSE comment a second saying why it waits (``X-GPUBroker-Progress: 1`` asks
    for the same per request; see ``proxy/progress.py``)."""
    detach: bool = False
    """A managed worker that outlives its broker (a crash or an ordinary stop) and is adopted by
    the next start; False: it dies with the broker (Linux: a parent-death signal)."""

    @property
    def classifier_name(self) -> str:
        """The classifier follows the strategy unless set: ``ollama-big`` is still Ollama."""
        return self.classifier or self.unload_strategy


@dataclass(frozen=True, slots=True)
class Config:
    """The whole resolved configuration. ``source`` is the file it came from, if any."""

    backends: tuple[BackendConfig, ...]
    status_port: int = DEFAULT_STATUS_PORT
    bind: str = "127.0.0.1"
    policy: Policy = "exclusive"
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    unload_timeout: float = 10.0
    hold_time: float = 10.0
    min_residency: float | None = None  # None: 3s under budget, 0 under exclusive
    priority_aging: float = 30.0
    upstream_timeout: float = 600.0
    upstream_idle_timeout: float = 300.0  # no response byte for this long ends the response
    header_timeout: float = 10.0  # a client must send its whole request head within this
    client_idle_timeout: float = 60.0  # a request body that stalls this long is cut off
    allowed_hosts: tuple[str, ...] = ()  # Host names our own listeners accept beyond loopback
    shutdown_grace: float = 30.0
    gpus: tuple[GpuSpec, ...] | Literal["auto"] = "auto"
    admin_token: str | None = None
    api_keys: tuple[ApiKey, ...] = ()
    telemetry: str = "auto"
    telemetry_url: str | None = None  # where `telemetry: sim` reads the simulated GPUs
    telemetry_interval: float = 2.0
    gpu_near_full: float = 0.95  # used/total at which the GPU-near-full warning fires
    disable_plugins: tuple[str, ...] = ()
    api_port: int | None = None  # the one endpoint for every model; None: off
    api_body_limit: int = DEFAULT_API_BODY_LIMIT  # bytes of a body read to find its model
    model_refresh: float = 30.0  # how often discovered model lists are read again
    state_dir: str | None = None
    """Where learned state (footprints) is kept; a relative path in a file is made relative to
    the file's folder when it loads. None: ``state_path``'s default (XDG_STATE_HOME)."""
    preload: tuple[str, ...] = ()
    """Backends and ``backend/model`` units made resident at start-up, in order, within the
    budget (``Broker.preload_all``); names checked at load (:mod:`~gpubroker.config.rules`)."""
    server: Literal["hypercorn", "uvicorn"] = "hypercorn"
    """The HTTP server for every port; ``uvicorn`` (with httptools) needs the ``fast`` extra."""
    source: str | None = None
    locations: Mapping[str, tuple[int, int]] = field(default_factory=dict, compare=False)

    @property
    def effective_hold_time(self) -> float:
        """``holdTime`` capped at half of ``queueTimeout``.

        While others wait, the owner keeps admitting for the hold; a hold as long as the queue
        timeout would let steady traffic to the owner time out every waiter, so that backend
        would never be served. Half leaves the swap itself the other half.
        """
        return min(self.hold_time, self.queue_timeout / 2)

    def backend(self, name: str) -> BackendConfig:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    def error(self, keypath: str, message: str) -> ConfigError:
        """A ConfigError pointing at ``keypath`` (or its nearest located parent)."""
        probe = keypath
        while probe and probe not in self.locations:
            probe = parent_keypath(probe)
        line, col = self.locations.get(probe, (None, None))
        return ConfigError(message, source=self.source, line=line, column=col, keypath=keypath)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config in the file's own key names (for ``serve --check``).

        Unset values are left out, so the output loads back as the same config, but for the
        secrets: ``adminToken`` and API keys written in the file show as ``(hidden)``.
        """
        out = _exported(self, TOP_KEYS)
        if self.admin_token is not None:
            out["adminToken"] = HIDDEN_KEY
        out["backends"] = [_exported(b, BACKEND_KEYS) for b in self.backends]
        return out


def parent_keypath(keypath: str) -> str:
    """``a.b[2]`` -> ``a.b`` -> ``a`` -> ``""``: where to look when a key has no location."""
    cut = max(keypath.rfind("."), keypath.rfind("["))
    return keypath[:cut] if cut > 0 else ""


def _exported(obj: Any, spec: Mapping[str, Field]) -> dict[str, Any]:
    values = {key: _export(getattr(obj, field_.attr)) for key, field_ in spec.items()}
    return {key: v for key, v in values.items() if v is not None and v != [] and v != {}}


def _export(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_export(v) for v in value]
    if isinstance(value, GpuSpec):
        return {
            k: v
            for k, v in (("id", value.id), ("memory", value.memory), ("reserve", value.reserve))
            if v is not None
        }
    if isinstance(value, ApiKey):  # never the key itself
        key = f"env:{value.env}" if value.env else HIDDEN_KEY
        out: dict[str, Any] = {"name": value.name, "key": key}
        if value.models is not None:
            out["models"] = list(value.models)
        return out
    if isinstance(value, ModelSpec):
        spec: dict[str, Any] = {"name": value.name, "aliases": list(value.aliases)}
        spec.update(upstreamModel=value.upstream_model, vram=value.vram)
        spec.update(pinned=value.pinned or None, exclusiveWith=list(value.exclusive_with))
        spec = {k: v for k, v in spec.items() if v is not None and v != []}
        return value.name if spec.keys() == {"name"} else spec
    if isinstance(value, Mapping):
        return dict(value)
    return value
