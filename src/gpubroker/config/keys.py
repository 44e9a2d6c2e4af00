"""The config's keys: each file key's attribute and the parser that checks its value.

Every parser returns the parsed value or raises ``ValueError("<what was expected>")``, which the
loader turns into a located error ("expected …, found …"). The tables are also what
``Config.to_dict`` writes back, so a key is named in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gpubroker.config.hosts import allowed_host_entry  # the Host check's own rule
from gpubroker.config.units import parse_duration, parse_size


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


def parse_port(value: object) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise ValueError("a port number from 1 to 65535")


def parse_url(value: object) -> str:
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


def _name_list(value: object) -> tuple[str, ...]:
    """``exclusiveWith``: one name or a list of them (a name listed twice counts once)."""
    names = [value] if isinstance(value, str) and value.strip() else value
    if isinstance(names, list) and names and all(isinstance(v, str) and v.strip() for v in names):
        return tuple(dict.fromkeys(v.strip() for v in names))
    raise ValueError("a name or a non-empty list of names (backends, or models they declare)")


def backend_name(value: object) -> str:
    """A backend's name: it is a path segment (``/proxy/NAME/``, ``/api/unload``) and the
    first half of a model's unit name (``NAME/MODEL``), so no "/", space or control character."""
    name = _str(value)
    if any(c == "/" or c.isspace() or not c.isprintable() for c in name):
        raise ValueError(
            'a name without "/", spaces or control characters (it appears in URLs such as '
            "/proxy/NAME/ and in the unit names NAME/MODEL)"
        )
    return name


def _host_list(value: object) -> tuple[str, ...]:
    """``allowedHosts``: names as the Host check compares them (lower case, no brackets)."""
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
class Field:
    """A file key's attribute on the config object and the parser of its value."""

    attr: str
    parse: Callable[[object], Any]


BACKEND_KEYS: dict[str, Field] = {
    "name": Field("name", backend_name),
    "proxyPort": Field("proxy_port", parse_port),
    "upstream": Field("upstream", parse_url),
    "unloadStrategy": Field("unload_strategy", _str),
    "unloadEndpoint": Field("unload_endpoint", _path),
    "loadEndpoint": Field("load_endpoint", _path),
    "classifier": Field("classifier", _str),
    "vram": Field("vram", parse_size),
    "priority": Field("priority", _int),
    "pinned": Field("pinned", _bool),
    "exclusiveWith": Field("exclusive_with", _name_list),
    "gpu": Field("gpu", _gpu_list),
    "gpuPaths": Field("gpu_paths", _gpu_paths),
    "sleepLevel": Field("sleep_level", _choice(1, 2)),
    "maxConcurrency": Field("max_concurrency", _positive_int),
    "healthPath": Field("health_path", _path),
    "command": Field("command", _str_list),
    "env": Field("env", _env),
    "cwd": Field("cwd", _str),
    "idleTimeout": Field("idle_timeout", _optional_duration),
    "startTimeout": Field("start_timeout", parse_duration),
    "stopTimeout": Field("stop_timeout", parse_duration),
    "autostart": Field("autostart", _bool),
    "restart": Field("restart", _choice("on-failure", "always", "never")),
    "logFile": Field("log_file", _str),
    "hostHeader": Field("host_header", _choice("client", "upstream")),
    "upstreamIdleTimeout": Field("upstream_idle_timeout", parse_duration),
    "models": Field("models", lambda v: v),  # parsed by the loader, which needs locations
    "progress": Field("progress", _choice("comments", "off")),
    "detach": Field("detach", _bool),
}
BACKEND_REQUIRED = ("name", "proxyPort", "upstream")

TOP_KEYS: dict[str, Field] = {
    "statusPort": Field("status_port", parse_port),
    "bind": Field("bind", _str),
    "policy": Field("policy", _choice("exclusive", "budget")),
    "queueTimeout": Field("queue_timeout", parse_duration),
    "unloadTimeout": Field("unload_timeout", parse_duration),
    "holdTime": Field("hold_time", parse_duration),
    "minResidency": Field("min_residency", parse_duration),
    "priorityAging": Field("priority_aging", parse_duration),
    "upstreamTimeout": Field("upstream_timeout", parse_duration),
    "upstreamIdleTimeout": Field("upstream_idle_timeout", parse_duration),
    "headerTimeout": Field("header_timeout", parse_duration),
    "clientIdleTimeout": Field("client_idle_timeout", parse_duration),
    "allowedHosts": Field("allowed_hosts", _host_list),
    "shutdownGrace": Field("shutdown_grace", parse_duration),
    "gpus": Field("gpus", lambda v: v),  # parsed by the loader, which needs locations
    "adminToken": Field("admin_token", _str),
    "apiKeys": Field("api_keys", lambda v: v),  # parsed by the loader: located, env-reading
    "telemetry": Field("telemetry", _str),
    "telemetryUrl": Field("telemetry_url", parse_url),
    "telemetryInterval": Field("telemetry_interval", _interval),
    "gpuNearFull": Field("gpu_near_full", _ratio),
    "disablePlugins": Field("disable_plugins", _str_list),
    "apiPort": Field("api_port", parse_port),
    "apiBodyLimit": Field("api_body_limit", parse_size),
    "modelRefresh": Field("model_refresh", _interval),
    "stateDir": Field("state_dir", _str),
    "preload": Field("preload", _str_list),  # names checked by the loader (config/rules.py)
    "server": Field("server", _choice("hypercorn", "uvicorn")),
}
API_KEY_KEYS: dict[str, Field] = {
    "name": Field("name", _str),
    "key": Field("key", lambda v: v),  # checked by the loader, which never echoes it
    "models": Field("models", _str_list),
}
API_KEY_MIN_LENGTH = 16
GPU_KEYS: dict[str, Field] = {
    "id": Field("id", _gpu_ref),
    "memory": Field("memory", parse_size),
    "reserve": Field("reserve", parse_size),
}
# One item of a backend's ``models:`` when written as a mapping (a bare string is ``name``).
MODEL_KEYS: dict[str, Field] = {
    "name": Field("name", _str),
    "aliases": Field("aliases", _str_list),
    "upstreamModel": Field("upstream_model", _str),
    "vram": Field("vram", parse_size),
    "pinned": Field("pinned", _bool),
    "exclusiveWith": Field("exclusive_with", _name_list),
}
