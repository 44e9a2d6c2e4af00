"""Load and validate gpubroker's YAML config (or the env-var quick mode) into frozen objects.

Keys are OneGPU4All's camelCase, so an ``onegpu4all.yaml`` loads unchanged; our extensions all
have safe defaults. The file is read with ruamel.yaml's round-trip loader so every error can name
the file, line and column of the offending key, and ``gpubroker init`` can write comments that
survive later edits.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from gpubroker.config.units import format_duration, parse_duration, parse_size
from gpubroker.errors import ConfigError

Policy = Literal["exclusive", "budget"]
Restart = Literal["on-failure", "always", "never"]
HostHeader = Literal["client", "upstream"]

DEFAULT_STATUS_PORT = 5102
DEFAULT_QUEUE_TIMEOUT = 120.0
CONFIG_ENV = "GPUBROKER_CONFIG"
CONFIG_NAMES = ("gpubroker.yaml", "onegpu4all.yaml")


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """A GPU declared in the config: ``id`` is an index or a UUID; sizes in bytes."""

    id: int | str
    memory: int | None = None
    reserve: int = 0


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
    telemetry: str = "auto"
    telemetry_url: str | None = None  # where `telemetry: sim` reads the simulated GPUs
    telemetry_interval: float = 2.0
    gpu_near_full: float = 0.95  # used/total at which the GPU-near-full warning fires
    disable_plugins: tuple[str, ...] = ()
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
            probe = probe.rpartition(".")[0] if "." in probe else ""
        line, col = self.locations.get(probe, (None, None))
        return ConfigError(message, source=self.source, line=line, column=col, keypath=keypath)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config in the file's own key names (for ``serve --check``).

        Unset values are left out, so the output loads back as the same config.
        """
        out = _exported(self, _TOP)
        out["backends"] = [_exported(b, _BACKEND) for b in self.backends]
        return out


def _exported(obj: Any, spec: Mapping[str, _Field]) -> dict[str, Any]:
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
    if isinstance(value, Mapping):
        return dict(value)
    return value


# --- field parsers: each returns the parsed value or raises ValueError("<what was expected>") --


def _str(value: object) -> str:
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError("a non-empty string")


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("true or false")


def _int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError("an integer")


def _positive_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError("an integer of at least 1")


def _port(value: object) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise ValueError("a port number from 1 to 65535")


def _url(value: object) -> str:
    if isinstance(value, str):
        parts = urlsplit(value.strip())
        try:
            port_ok = parts.port is None or 1 <= parts.port <= 65535
        except ValueError:
            port_ok = False
        bare = parts.path in ("", "/") and not parts.query and not parts.fragment
        if parts.scheme in ("http", "https") and parts.hostname and port_ok and bare:
            return value.strip().rstrip("/")
    raise ValueError(
        "an http:// or https:// URL with a host and no path, such as http://127.0.0.1:11434"
    )


def _path(value: object) -> str:
    if isinstance(value, str) and value.startswith("/"):
        return value
    raise ValueError("a URL path starting with /")


def _choice(*options: Any) -> Callable[[object], Any]:
    """Accept exactly one of ``options`` (same type too: ``true`` is not ``1``)."""

    def parse(value: object) -> Any:
        for option in options:
            if type(value) is type(option) and value == option:
                return option
        raise ValueError("one of " + ", ".join(str(o) for o in options))

    return parse


def _ratio(value: object) -> float:
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            pass
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value)
    raise ValueError("a fraction such as 0.95 or a percentage such as 95%")


def _interval(value: object) -> float:
    seconds = parse_duration(value)
    if seconds < 0.1:
        raise ValueError("an interval of at least 100ms")
    return seconds


def _optional_duration(value: object) -> float | None:
    if value in (None, "never", "off", 0):
        return None
    return parse_duration(value)


def _gpu_ref(value: object) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, str) and value.startswith(("GPU-", "MIG-")):
        return value
    raise ValueError("a GPU index (0, 1, …) or UUID (GPU-…)")


def _gpu_list(value: object) -> tuple[int | str, ...]:
    if isinstance(value, list):
        if not value:
            raise ValueError("a GPU index or UUID, or a non-empty list of them")
        return tuple(_gpu_ref(v) for v in value)
    return (_gpu_ref(value),)


def _str_list(value: object) -> tuple[str, ...]:
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError("a non-empty list of strings")


def _host_list(value: object) -> tuple[str, ...]:
    """``allowedHosts``: names as the Host check compares them (lower case, no brackets)."""
    from gpubroker.observe.guard import (
        allowed_host_entry,  # the Host check's own rule, so the two cannot differ
    )

    out = []
    for entry in _str_list(value):
        try:
            out.append(allowed_host_entry(entry))
        except ValueError as exc:
            raise ValueError(f"{exc} instead of {entry!r}") from None
    return tuple(out)


def _gpu_paths(value: object) -> tuple[str, ...]:
    items = _str_list(value)
    for item in items:
        path = item.split(None, 1)[-1]
        if not path.startswith("/"):
            raise ValueError('a list of paths such as "/api/generate" or "POST /v1/*"')
    return items


def _env(value: object) -> Mapping[str, str]:
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {str(k): str(v) for k, v in value.items()}
    raise ValueError("a mapping of variable names to values")


@dataclass(frozen=True, slots=True)
class _Field:
    attr: str
    parse: Callable[[object], Any]


_BACKEND: dict[str, _Field] = {
    "name": _Field("name", _str),
    "proxyPort": _Field("proxy_port", _port),
    "upstream": _Field("upstream", _url),
    "unloadStrategy": _Field("unload_strategy", _str),
    "unloadEndpoint": _Field("unload_endpoint", _path),
    "loadEndpoint": _Field("load_endpoint", _path),
    "classifier": _Field("classifier", _str),
    "vram": _Field("vram", parse_size),
    "priority": _Field("priority", _int),
    "pinned": _Field("pinned", _bool),
    "gpu": _Field("gpu", _gpu_list),
    "gpuPaths": _Field("gpu_paths", _gpu_paths),
    "sleepLevel": _Field("sleep_level", _choice(1, 2)),
    "maxConcurrency": _Field("max_concurrency", _positive_int),
    "healthPath": _Field("health_path", _path),
    "command": _Field("command", _str_list),
    "env": _Field("env", _env),
    "cwd": _Field("cwd", _str),
    "idleTimeout": _Field("idle_timeout", _optional_duration),
    "startTimeout": _Field("start_timeout", parse_duration),
    "stopTimeout": _Field("stop_timeout", parse_duration),
    "autostart": _Field("autostart", _bool),
    "restart": _Field("restart", _choice("on-failure", "always", "never")),
    "logFile": _Field("log_file", _str),
    "hostHeader": _Field("host_header", _choice("client", "upstream")),
    "upstreamIdleTimeout": _Field("upstream_idle_timeout", parse_duration),
}
_BACKEND_REQUIRED = ("name", "proxyPort", "upstream")

_TOP: dict[str, _Field] = {
    "statusPort": _Field("status_port", _port),
    "bind": _Field("bind", _str),
    "policy": _Field("policy", _choice("exclusive", "budget")),
    "queueTimeout": _Field("queue_timeout", parse_duration),
    "unloadTimeout": _Field("unload_timeout", parse_duration),
    "holdTime": _Field("hold_time", parse_duration),
    "minResidency": _Field("min_residency", parse_duration),
    "priorityAging": _Field("priority_aging", parse_duration),
    "upstreamTimeout": _Field("upstream_timeout", parse_duration),
    "upstreamIdleTimeout": _Field("upstream_idle_timeout", parse_duration),
    "headerTimeout": _Field("header_timeout", parse_duration),
    "clientIdleTimeout": _Field("client_idle_timeout", parse_duration),
    "allowedHosts": _Field("allowed_hosts", _host_list),
    "shutdownGrace": _Field("shutdown_grace", parse_duration),
    "gpus": _Field("gpus", lambda v: v),  # parsed by _parse_gpus, which needs locations
    "adminToken": _Field("admin_token", _str),
    "telemetry": _Field("telemetry", _str),
    "telemetryUrl": _Field("telemetry_url", _url),
    "telemetryInterval": _Field("telemetry_interval", _interval),
    "gpuNearFull": _Field("gpu_near_full", _ratio),
    "disablePlugins": _Field("disable_plugins", _str_list),
}
_GPU: dict[str, _Field] = {
    "id": _Field("id", _gpu_ref),
    "memory": _Field("memory", parse_size),
    "reserve": _Field("reserve", parse_size),
}


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):  # as the file spells it
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Loader:
    """Walks the round-trip tree, collecting ``keypath -> (line, column)`` as it validates."""

    def __init__(self, source: str | None) -> None:
        self.source = source
        self.locations: dict[str, tuple[int, int]] = {}

    def fail(self, keypath: str, message: str, at: tuple[int, int] | None = None) -> ConfigError:
        line, col = at if at else self.locations.get(keypath, (None, None))
        return ConfigError(message, source=self.source, line=line, column=col, keypath=keypath)

    def note(self, node: Any, key: Any, keypath: str) -> None:
        try:
            if isinstance(node, CommentedMap):
                line, col = node.lc.key(key)
            elif isinstance(node, CommentedSeq):
                line, col = node.lc.item(key)
            else:
                return
        except (KeyError, IndexError, TypeError):
            return
        self.locations[keypath] = (line + 1, col + 1)

    def mapping(self, node: Any, keypath: str, spec: Mapping[str, _Field]) -> dict[str, Any]:
        if not isinstance(node, Mapping):
            where = keypath or "the top level"
            raise self.fail(keypath, f"expected a mapping at {where}, found {_describe(node)}")
        out: dict[str, Any] = {}
        for key, value in node.items():
            path = f"{keypath}.{key}" if keypath else str(key)
            self.note(node, key, path)
            if key not in spec:
                hint = difflib.get_close_matches(str(key), list(spec), n=1)
                tip = f"did you mean {hint[0]!r}?" if hint else f"known keys: {', '.join(spec)}"
                raise self.fail(path, f"unknown key ({tip})")
            field_ = spec[key]
            try:
                out[field_.attr] = field_.parse(value)
            except ValueError as exc:
                raise self.fail(path, f"expected {exc}, found {_describe(value)}") from None
        return out

    def gpus(self, node: Any) -> tuple[GpuSpec, ...] | Literal["auto"]:
        if node == "auto":
            return "auto"
        if not isinstance(node, list) or not node:
            raise self.fail("gpus", f"expected auto or a list of GPUs, found {_describe(node)}")
        specs: list[GpuSpec] = []
        for i, item in enumerate(node):
            path = f"gpus[{i}]"
            self.note(node, i, path)
            if not isinstance(item, Mapping):
                item = {"id": item}
            values = self.mapping(item, path, _GPU)
            if "id" not in values:
                raise self.fail(path, "missing required key 'id' (a GPU index or UUID)")
            specs.append(GpuSpec(**values))
        return tuple(specs)

    def backends(self, node: Any) -> tuple[BackendConfig, ...]:
        if not isinstance(node, list):
            raise self.fail("backends", f"expected a list of backends, found {_describe(node)}")
        out: list[BackendConfig] = []
        seen_names: dict[str, str] = {}
        seen_ports: dict[int, str] = {}
        for i, item in enumerate(node):
            path = f"backends[{i}]"
            self.note(node, i, path)
            values = self.mapping(item, path, _BACKEND)
            for key in _BACKEND_REQUIRED:
                if _BACKEND[key].attr not in values:
                    raise self.fail(path, f"missing required key {key!r}")
            name = values["name"]
            if name in seen_names:
                raise self.fail(
                    f"{path}.name", f"duplicate backend name {name!r} (also {seen_names[name]})"
                )
            seen_names[name] = path
            port = values["proxy_port"]
            if port in seen_ports:
                raise self.fail(
                    f"{path}.proxyPort", f"port {port} is already used by {seen_ports[port]}"
                )
            seen_ports[port] = f"{path} ({name})"
            out.append(BackendConfig(**values))
        return tuple(out)


def parse_config(data: Any, source: str | None = None) -> Config:
    """Validate an already-loaded YAML tree (round-trip or plain dicts) into a Config."""
    loader = _Loader(source)
    if data is None:
        data = CommentedMap()
    top_spec = dict(_TOP, backends=_Field("backends", lambda v: v))
    values = loader.mapping(data, "", top_spec)
    backends = loader.backends(values.pop("backends", []))
    if "gpus" in values:
        values["gpus"] = loader.gpus(values["gpus"])
    if values.get("telemetry") == "sim" and "telemetry_url" not in values:
        raise loader.fail(
            "telemetry", "`telemetry: sim` needs `telemetryUrl:` (the simulated GPUs' /gpus URL)"
        )
    queue_timeout = values.get("queue_timeout", DEFAULT_QUEUE_TIMEOUT)
    if "hold_time" in values and values["hold_time"] >= queue_timeout:
        raise loader.fail(
            "holdTime",
            f"holdTime ({format_duration(values['hold_time'])}) must be shorter than "
            f"queueTimeout ({format_duration(queue_timeout)}): while "
            "others wait the owner keeps admitting for holdTime, so every waiter would time "
            "out before its turn",
        )
    status_port = values.get("status_port", DEFAULT_STATUS_PORT)
    for i, b in enumerate(backends):
        if b.proxy_port == status_port:
            raise loader.fail(
                f"backends[{i}].proxyPort",
                f"port {status_port} is the statusPort; give this backend another port",
            )
    own = {status_port: "statusPort", **{b.proxy_port: f"{b.name}'s proxyPort" for b in backends}}
    bind = values.get("bind", "127.0.0.1")
    for i, b in enumerate(backends):
        parts = urlsplit(b.upstream)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if port in own and _is_own_host(parts.hostname or "", bind):
            raise loader.fail(
                f"backends[{i}].upstream",
                f"{b.upstream} is this broker's own {own[port]}: requests would loop through "
                "the broker; point upstream at the service itself",
            )
    return Config(backends=backends, source=source, locations=loader.locations, **values)


def _is_own_host(host: str, bind: str) -> bool:
    """Whether ``host`` names an address the broker's own listeners answer on (no lookups)."""
    host, bind = host.lower().rstrip("."), bind.lower().strip("[]")
    if host in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "::", bind):
        return True
    if bind in ("0.0.0.0", "::"):  # listening everywhere: every loopback address is ours too
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host.endswith(".localhost")
    return False  # a name: only a lookup could tell; the Via hop bound catches that loop


def load_config_file(path: Path) -> Config:
    """Read, parse and validate one YAML file; every failure is a located ConfigError."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", source=source) from None
    try:
        data = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(
            f"invalid YAML: {problem}", source=source, line=line, column=col
        ) from None
    except Exception as exc:  # ruamel raises a few unmarked errors (e.g. duplicate keys)
        raise ConfigError(f"invalid YAML: {exc}".splitlines()[0], source=source) from None
    return parse_config(data, source)


def _env_port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return _port(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"expected {exc}, found {raw!r}", source=f"${name}") from None


def config_from_env(env: Mapping[str, str]) -> Config | None:
    """OneGPU4All's quick mode: upstreams and ports from env vars, no file. None if unset."""
    wanted = [
        ("ollama", "OLLAMA_UPSTREAM", "BROKER_OLLAMA_PORT", 5001),
        ("comfyui", "COMFYUI_UPSTREAM", "BROKER_COMFYUI_PORT", 5002),
    ]
    backends = []
    port_vars = []
    for name, url_var, port_var, default_port in wanted:
        url = env.get(url_var)
        if not url:
            continue
        try:
            upstream = _url(url)
        except ValueError as exc:
            raise ConfigError(f"expected {exc}, found {url!r}", source=f"${url_var}") from None
        port = _env_port(env, port_var, default_port)
        port_vars.append(port_var)
        backends.append(
            BackendConfig(name=name, proxy_port=port, upstream=upstream, unload_strategy=name)
        )
    if not backends:
        return None
    status_port = _env_port(env, "BROKER_STATUS_PORT", DEFAULT_STATUS_PORT)
    taken = {status_port: "BROKER_STATUS_PORT"}
    for backend, port_var in zip(backends, port_vars, strict=True):
        other = taken.setdefault(backend.proxy_port, port_var)
        if other != port_var:
            raise ConfigError(
                f"port {backend.proxy_port} is already ${other}; give {backend.name} another port",
                source=f"${port_var}",
            )
    data = {"statusPort": status_port}
    cfg = parse_config(data, source="environment")
    return Config(
        **{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "backends"},
        backends=tuple(backends),
    )


def default_config_paths(env: Mapping[str, str]) -> list[Path]:
    """Where a config is looked for, in order, when none is named."""
    paths = [Path.cwd() / name for name in CONFIG_NAMES]
    xdg = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    paths.append(Path(xdg) / "gpubroker" / "gpubroker.yaml")
    return paths


def resolve_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """The config a command should use: ``--config``, $GPUBROKER_CONFIG, a usual place, env vars."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    if path is not None:
        return load_config_file(path)
    for candidate in default_config_paths(env):
        if candidate.is_file():
            return load_config_file(candidate)
    from_env = config_from_env(env)
    if from_env is not None:
        return from_env
    looked = ", ".join(str(p) for p in default_config_paths(env))
    raise ConfigError(
        "no config found (looked in " + looked + "); run `gpubroker init` to write one, "
        "or set OLLAMA_UPSTREAM / COMFYUI_UPSTREAM for the quick mode"
    )


def describe_config(cfg: Config) -> str:
    """A short human summary for ``serve`` start-up and ``serve --check``."""
    lines = [
        f"config: {cfg.source or 'defaults'}",
        f"policy: {cfg.policy}, queueTimeout {format_duration(cfg.queue_timeout)}, "
        f"unloadTimeout {format_duration(cfg.unload_timeout)}, "
        f"holdTime {format_duration(cfg.hold_time)}"
        + (
            f" (capped at {format_duration(cfg.effective_hold_time)}, half of queueTimeout)"
            if cfg.effective_hold_time < cfg.hold_time
            else ""
        ),
        f"status: http://{f'[{cfg.bind}]' if ':' in cfg.bind else cfg.bind}:{cfg.status_port}",
    ]
    for b in cfg.backends:
        lines.append(
            f"  {b.name}: :{b.proxy_port} -> {b.upstream} "
            f"(strategy {b.unload_strategy}, classifier {b.classifier_name})"
        )
    return "\n".join(lines)
