"""Ollama: its version, and the two settings that can overrule the broker's decisions.

Facts read at ollama/ollama v0.33.0-rc2 (commit fb30760):

- server/routes.go: ``GET /api/version`` answers ``{"version": ...}``.
- envconfig/config.go ``Var``: a variable's value is trimmed of spaces and of quotes.
  ``KeepAlive``: ``OLLAMA_KEEP_ALIVE`` as a Go duration (``time.ParseDuration``), else an integer
  of seconds, else the default 5m; negative is forever, 0 unloads a model as soon as its
  request ends. ``MaxRunners``: ``OLLAMA_MAX_LOADED_MODELS``, an unsigned integer (invalid: the
  default), 0 meaning server/sched.go's ``defaultModelsPerGPU`` (3) per GPU.
- Neither is served by any API: the doctor reads them from the process listening on the
  upstream's port where it runs here and may be read, else from the managed worker's
  ``command:`` and ``env:`` (:mod:`~gpubroker.doctor.local`).

Why they matter: Ollama unloads a model once its keep-alive runs out and evicts one itself when
more than ``OLLAMA_MAX_LOADED_MODELS`` would be loaded, behind the broker's back; gpubroker
frees Ollama's models itself (``keep_alive: 0`` for the one that must go) when something else
needs the memory, and under ``policy: budget`` plans several models side by side.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import httpx

from gpubroker.config.model import BackendConfig, Config
from gpubroker.config.units import format_duration
from gpubroker.doctor.findings import Finding
from gpubroker.doctor.local import Launch
from gpubroker.doctor.services import Unreachable, fetch, json_of, launch, unreachable

DEFAULT_KEEP_ALIVE = 300.0
DEFAULT_MODELS_PER_GPU = 3
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def _var(env: Mapping[str, str], key: str) -> str:
    return env.get(key, "").strip().strip("\"'")


def _go_duration(text: str) -> float | None:
    """Seconds from a Go duration string (``1h30m``, ``-1s``, ``0``), or None if it is none."""
    sign, rest = 1.0, text
    if rest[:1] in "+-" and rest:
        sign, rest = (-1.0 if rest[0] == "-" else 1.0), rest[1:]
    if rest == "0":
        return 0.0
    total, at = 0.0, 0
    while at < len(rest):
        match = _GO_PART.match(rest, at)
        if match is None:
            return None
        total += float(match[1]) * _GO_UNITS[match[2]]
        at = match.end()
    return sign * total if rest else None


def keep_alive(env: Mapping[str, str]) -> float:
    """Seconds a model stays loaded after its last request (``math.inf``: forever)."""
    raw = _var(env, "OLLAMA_KEEP_ALIVE")
    seconds = DEFAULT_KEEP_ALIVE
    if raw:
        parsed = _go_duration(raw)
        if parsed is None and re.fullmatch(r"[-+]?\d+", raw):
            parsed = float(int(raw))
        if parsed is not None:
            seconds = parsed
    return math.inf if seconds < 0 else seconds


def max_loaded(env: Mapping[str, str]) -> int:
    """``OLLAMA_MAX_LOADED_MODELS`` as Ollama reads it (0: its default, 3 per GPU)."""
    raw = _var(env, "OLLAMA_MAX_LOADED_MODELS")
    return int(raw) if raw.isdigit() else 0


def _said(env: Mapping[str, str], key: str) -> str:
    raw = _var(env, key)
    return f"{key}={raw}" if raw else f"{key} unset"


def env_findings(
    backend: BackendConfig, env: Mapping[str, str], where: str, budget: bool
) -> list[Finding]:
    """What ``OLLAMA_KEEP_ALIVE`` and ``OLLAMA_MAX_LOADED_MODELS`` in ``env`` mean here."""
    out: list[Finding] = []
    keep, n = keep_alive(env), max_loaded(env)
    facts: dict[str, Any] = {
        "source": where,
        "keepAlive": None if math.isinf(keep) else keep,
        "maxLoadedModels": n,
    }
    said = _said(env, "OLLAMA_KEEP_ALIVE")
    forever = "OLLAMA_KEEP_ALIVE=-1 keeps every model until gpubroker frees it"
    if keep == 0:
        out.append(
            Finding(
                "ollama",
                "warning",
                f"{said} ({where}): Ollama unloads each model as soon as its request ends, so "
                "every request loads it again and nothing gpubroker keeps resident stays",
                f"set {forever} (set `idleTimeout:` on {backend.name} to free it when unused)",
                backend.name,
                facts,
            )
        )
    elif not math.isinf(keep) and backend.idle_timeout and backend.idle_timeout > keep:
        out.append(
            Finding(
                "ollama",
                "warning",
                f"{said} ({where}): Ollama unloads a model idle for {format_duration(keep)} "
                f"itself, before {backend.name}'s idleTimeout "
                f"({format_duration(backend.idle_timeout)}) would",
                f"set {forever}, so idleTimeout decides",
                backend.name,
                facts,
            )
        )
    elif not math.isinf(keep):
        out.append(
            Finding(
                "ollama",
                "info",
                f"{said} ({where}): Ollama unloads a model idle for {format_duration(keep)} "
                "by itself; gpubroker sees it gone in /api/ps",
                f"{forever} (and `idleTimeout:` frees it when unused)",
                backend.name,
                facts,
            )
        )
    else:
        out.append(
            Finding(
                "ollama",
                "ok",
                f"{said} ({where}): models stay loaded until gpubroker frees them",
                backend=backend.name,
                facts=facts,
            )
        )
    declared = len(backend.models or ())
    if budget and n and (n == 1 or declared > n):
        out.append(
            Finding(
                "ollama",
                "warning",
                f"OLLAMA_MAX_LOADED_MODELS={n} ({where}): loading model {n + 1} makes Ollama "
                f"evict one itself, while policy: budget plans "
                f"{'the ' + str(declared) + ' declared models' if declared > n else 'models'} "
                "side by side as the memory allows",
                "unset OLLAMA_MAX_LOADED_MODELS (Ollama's default: 3 per GPU) or raise it; "
                "gpubroker's budget decides what fits",
                backend.name,
                facts,
            )
        )
    return out


async def check(client: httpx.AsyncClient, cfg: Config, backend: BackendConfig) -> list[Finding]:
    try:
        response = await fetch(client, backend.upstream.rstrip("/") + "/api/version")
    except Unreachable as exc:
        if not backend.command:
            raise
        out = [unreachable(backend, "ollama", str(exc))]  # a managed worker, not started yet
        start = await launch(backend, listening=False)  # what command: would start
        if start is not None and start.env is not None:
            out += env_findings(backend, start.env, start.where, cfg.policy == "budget")
        return out
    body = json_of(response)
    version = body.get("version") if isinstance(body, dict) else None
    facts = {"url": backend.upstream, "kind": "ollama", "version": version}
    if response.status_code != 200 or not isinstance(version, str):
        return [
            Finding(
                "ollama",
                "error",
                f"{backend.upstream}/api/version answers {response.status_code} without a "
                "version: is it Ollama?",
                f"point `upstream:` at Ollama (default port 11434), or give {backend.name} "
                "the strategy of what runs there",
                backend.name,
                facts,
            )
        ]
    out = [Finding("upstream", "ok", f"Ollama {version} at {backend.upstream}", None,
                   backend.name, facts)]  # fmt: skip
    found: Launch | None = await launch(backend)
    if found is None:
        out.append(
            Finding(
                "ollama",
                "info",
                "Ollama's environment cannot be read from here (it runs on another host or "
                "in a container): OLLAMA_KEEP_ALIVE and OLLAMA_MAX_LOADED_MODELS not checked",
                "set OLLAMA_KEEP_ALIVE=-1 where Ollama runs, and leave "
                "OLLAMA_MAX_LOADED_MODELS unset",
                backend.name,
            )
        )
    elif found.env is None or (found.pid is not None and not found.mentions("ollama")):
        if found.env is None:
            why, fix = (
                "its environment is not readable",
                "run the doctor as the user Ollama runs as, or root (a systemd service: "
                "`systemctl show ollama -p Environment` lists them)",
            )
        else:
            why, fix = (
                "not Ollama itself (a proxy, or a container's published port?)",
                (
                    "set OLLAMA_KEEP_ALIVE=-1 where Ollama runs, and leave "
                    "OLLAMA_MAX_LOADED_MODELS unset"
                ),
            )
        out.append(
            Finding(
                "ollama",
                "info",
                f"the process on {backend.name}'s upstream port is {found.where}, {why}: "
                "OLLAMA_KEEP_ALIVE and OLLAMA_MAX_LOADED_MODELS not checked",
                fix,
                backend.name,
                {"pid": found.pid},
            )
        )
    else:
        out += env_findings(backend, found.env, found.where, cfg.policy == "budget")
    return out
