"""Load and validate gpubroker's YAML config (or the env-var quick mode) into frozen objects.

The objects are :mod:`~gpubroker.config.model`'s, each key checked by its parser in
:mod:`~gpubroker.config.keys`; here are reading the file (every error located), the checks that
span keys, the env-var quick mode, finding the config a command uses, and its summary.

Keys are OneGPU4All's camelCase, so an ``onegpu4all.yaml`` loads unchanged; our extensions all
have safe defaults. The file is read with ruamel.yaml's round-trip loader so every error can name
the file, line and column of the offending key, and ``gpubroker init`` can write comments that
survive later edits.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from gpubroker.config.hosts import is_loopback
from gpubroker.config.keys import (
    API_KEY_KEYS,
    API_KEY_MIN_LENGTH,
    BACKEND_KEYS,
    BACKEND_REQUIRED,
    GPU_KEYS,
    MODEL_KEYS,
    TOP_KEYS,
    Field,
    parse_port,
    parse_url,
)
from gpubroker.config.model import (
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_STATUS_PORT,
    ApiKey,
    BackendConfig,
    Config,
    GpuSpec,
    ModelSpec,
    parent_keypath,
)
from gpubroker.config.rules import check_preload, check_residency, residency_notes
from gpubroker.config.units import format_duration
from gpubroker.errors import ConfigError

CONFIG_ENV = "GPUBROKER_CONFIG"
CONFIG_NAMES = ("gpubroker.yaml", "onegpu4all.yaml")


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

    def fail_near(self, keypath: str, message: str) -> ConfigError:
        """``fail`` at ``keypath``'s location, else at its nearest located parent's."""
        probe = keypath
        while probe and probe not in self.locations:
            probe = parent_keypath(probe)
        return self.fail(keypath, message, self.locations.get(probe))

    def note_items(self, node: Any, key: str, keypath: str) -> None:
        """Locate each item of the list under ``node[key]`` (for errors about one item)."""
        items = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(items, list):
            for i in range(len(items)):
                self.note(items, i, f"{keypath}.{key}[{i}]")

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

    def mapping(self, node: Any, keypath: str, spec: Mapping[str, Field]) -> dict[str, Any]:
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
            values = self.mapping(item, path, GPU_KEYS)
            if "id" not in values:
                raise self.fail(path, "missing required key 'id' (a GPU index or UUID)")
            specs.append(GpuSpec(**values))
        return tuple(specs)

    def api_keys(self, node: Any, env: Mapping[str, str]) -> tuple[ApiKey, ...]:
        """``apiKeys``: named Bearer keys, ``key: env:VAR`` read from ``env`` now. No message
        here ever quotes a key, since errors are printed and logged."""
        if not isinstance(node, list):
            raise self.fail("apiKeys", f"expected a list of keys, found {_describe(node)}")
        out: list[ApiKey] = []
        seen: dict[str, str] = {}
        for i, item in enumerate(node):
            path = f"apiKeys[{i}]"
            self.note(node, i, path)
            values = self.mapping(item, path, API_KEY_KEYS)
            for required in ("name", "key"):
                if required not in values:
                    raise self.fail(path, f"missing required key {required!r}")
            name = values["name"].strip()
            if name in seen:
                raise self.fail(f"{path}.name", f"duplicate key name {name!r} (also {seen[name]})")
            seen[name] = path
            key, var = values["key"], None
            if isinstance(key, str) and key.startswith("env:"):
                var = key[4:].strip()
                if not var:
                    raise self.fail(f"{path}.key", "expected env:VARIABLE, with a variable name")
                if not env.get(var):
                    raise self.fail(
                        f"{path}.key", f"the environment variable {var} is not set (or empty)"
                    )
                key = env[var]
            if not isinstance(key, str) or not key.strip():
                raise self.fail(f"{path}.key", "expected a non-empty string (or env:VARIABLE)")
            if len(key.strip()) < API_KEY_MIN_LENGTH:
                where = f"${var}" if var else "the key"
                raise self.fail(
                    f"{path}.key",
                    f"{where} has {len(key.strip())} characters; an API key needs at least "
                    f"{API_KEY_MIN_LENGTH} (try `openssl rand -hex 24`)",
                )
            out.append(ApiKey(name, key.strip(), values.get("models"), var))
        return tuple(out)

    def models(self, node: Any, keypath: str) -> tuple[ModelSpec, ...]:
        """A backend's ``models:``: names, or mappings ``{name, aliases, upstreamModel, vram}``;
        no name (or alias) twice in one backend, as a request could not tell them apart."""
        if not isinstance(node, list) or not node:
            raise self.fail(
                keypath, f"expected a non-empty list of model names, found {_describe(node)}"
            )
        specs: list[ModelSpec] = []
        seen: dict[str, str] = {}
        for i, item in enumerate(node):
            path = f"{keypath}[{i}]"
            self.note(node, i, path)
            if isinstance(item, str):
                item = {"name": item}
            values = self.mapping(item, path, MODEL_KEYS)
            self.note_items(item, "exclusiveWith", path)
            if "name" not in values:
                raise self.fail(path, "missing required key 'name' (the model's name)")
            spec = ModelSpec(**values)
            for name in spec.names:
                if name in seen:
                    raise self.fail(path, f"model name {name!r} is also {seen[name]}")
                seen[name] = path
            specs.append(spec)
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
            values = self.mapping(item, path, BACKEND_KEYS)
            self.note_items(item, "exclusiveWith", path)
            if "models" in values:
                values["models"] = self.models(values["models"], f"{path}.models")
            for key in BACKEND_REQUIRED:
                if BACKEND_KEYS[key].attr not in values:
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
            if values.get("detach") and "command" not in values:
                raise self.fail(
                    f"{path}.detach",
                    "detach is for a managed worker (a backend with `command:`): there is no "
                    "process of ours to detach",
                )
            out.append(BackendConfig(**values))
        check_residency(out, self.fail_near)
        return tuple(out)


def parse_config(
    data: Any, source: str | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Validate an already-loaded YAML tree (round-trip or plain dicts) into a Config.

    ``env``: where ``env:VAR`` values are read (the process environment when None)."""
    loader = _Loader(source)
    if data is None:
        data = CommentedMap()
    top_spec = dict(TOP_KEYS, backends=Field("backends", lambda v: v))
    values = loader.mapping(data, "", top_spec)
    backends = loader.backends(values.pop("backends", []))
    if "preload" in values:
        for i in range(len(data["preload"])):
            loader.note(data["preload"], i, f"preload[{i}]")
        check_preload(backends, values["preload"], loader.fail_near)
    if "gpus" in values:
        values["gpus"] = loader.gpus(values["gpus"])
    if "api_keys" in values:
        values["api_keys"] = loader.api_keys(values["api_keys"], os.environ if env is None else env)
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
    api_port = values.get("api_port")
    if api_port is not None:
        taken = {
            status_port: "the statusPort",
            **{b.proxy_port: f"{b.name}'s proxyPort" for b in backends},
        }
        if api_port in taken:
            raise loader.fail(
                "apiPort", f"port {api_port} is {taken[api_port]}; give the apiPort another port"
            )
    own = {status_port: "statusPort", **{b.proxy_port: f"{b.name}'s proxyPort" for b in backends}}
    if api_port is not None:
        own[api_port] = "apiPort"
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
    if values.get("api_port") is not None and not values.get("api_keys") and not is_loopback(bind):
        raise loader.fail(
            "apiPort",
            f"the apiPort would listen on {bind}, beyond this machine, with no apiKeys: "
            "anyone who can reach it could use every model; add `apiKeys:` (a name and a "
            "key per caller) or bind to 127.0.0.1",
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


def load_config_file(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate one YAML file; every failure is a located ConfigError.

    ``env``: where ``env:VAR`` values are read (the process environment when None)."""
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
    cfg = parse_config(data, source, env)
    state = cfg.state_dir
    if state is not None and not state.startswith("~") and not Path(state).is_absolute():
        cfg = replace(cfg, state_dir=str(path.absolute().parent / state))  # beside the file
    return cfg


def _env_port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return parse_port(raw.strip())
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
            upstream = parse_url(url)
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


def state_path(cfg: Config, env: Mapping[str, str]) -> Path:
    """Where learned state is kept: ``stateDir`` ("~" expanded; a relative one was made
    relative to its file when it loaded, else it is relative to the working directory), else
    $XDG_STATE_HOME/gpubroker (an absolute one, as the XDG spec asks), else
    ~/.local/state/gpubroker. Nothing is created or read here."""
    home = Path(env.get("HOME") or Path.home())
    if cfg.state_dir is not None:
        state = cfg.state_dir
        if state == "~" or state.startswith("~/"):
            return home / state[2:]
        return Path(os.path.expanduser(state)).absolute()  # ~user/... too
    xdg = env.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "state"
    return base / "gpubroker"


def resolve_config(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """The config a command should use: ``--config``, $GPUBROKER_CONFIG, a usual place, env vars."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    if path is not None:
        return load_config_file(path, env)
    for candidate in default_config_paths(env):
        if candidate.is_file():
            return load_config_file(candidate, env)
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
        f"server: {cfg.server}",
    ]
    if cfg.api_port is not None:
        host = f"[{cfg.bind}]" if ":" in cfg.bind else cfg.bind
        lines.append(
            f"api: http://{host}:{cfg.api_port}/v1 (every model; body limit "
            f"{cfg.api_body_limit // 2**20}MiB, modelRefresh {format_duration(cfg.model_refresh)})"
        )
    for b in cfg.backends:
        lines.append(
            f"  {b.name}: :{b.proxy_port} -> {b.upstream} "
            f"(strategy {b.unload_strategy}, classifier {b.classifier_name})"
            + (f", models {', '.join(n for m in b.models for n in m.names)}" if b.models else "")
        )
    if cfg.api_keys:  # the names only: a key is never printed
        lines.append("apiKeys: " + ", ".join(_key_summary(k) for k in cfg.api_keys))
    if cfg.preload:
        lines.append("preload: " + ", ".join(cfg.preload))
    lines.extend(residency_notes(cfg))
    return "\n".join(lines)


def _key_summary(key: ApiKey) -> str:
    where = f" (from ${key.env})" if key.env else ""
    models = "" if key.models is None else f" [models: {', '.join(key.models)}]"
    return key.name + where + models
