"""vLLM: its version, and whether the ``vllm`` strategy can free its memory at all.

The strategy sleeps and wakes vLLM (``POST /sleep``, ``/wake_up``, ``GET /is_sleeping``,
``/collective_rpc`` for ``sleepLevel: 2``: plugins/strategies/builtin.py ``VLLMStrategy``).
Facts read in the vllm 0.33.0 wheel (paths under vllm/):

- those endpoints exist only with ``VLLM_SERVER_DEV_MODE=1``
  (entrypoints/launchers/api_server/routers.py registers the dev routers then), else 404: so
  ``GET /is_sleeping`` answering 200 is dev mode on, 404 off;
- a sleep frees memory only with ``--enable-sleep-mode``; without it ``/sleep`` succeeds and
  ``/is_sleeping`` says true while nothing is freed. Over HTTP only the dev-mode
  ``GET /server_info?config_format=json`` tells (``vllm_config.model_config.enable_sleep_mode``,
  entrypoints/serve/dev/server_info/api_router.py); otherwise the command line does, where
  the doctor can read it (:mod:`~gpubroker.doctor.local`);
- ``GET /version`` answers ``{"version"}`` (entrypoints/serve/instrumentator/basic.py).
"""

from __future__ import annotations

from typing import Any

import httpx

from gpubroker.config.model import BackendConfig, Config
from gpubroker.doctor.findings import Finding
from gpubroker.doctor.services import Unreachable, fetch, json_of, launch, unreachable

BOTH = "VLLM_SERVER_DEV_MODE=1 in its environment and --enable-sleep-mode on its command line"
OR_PROCESS = (
    "; or, to stop and start it instead, give it `unloadStrategy: process` and its `command:`"
)


def _sleep_mode(info: Any) -> bool | None:
    if not isinstance(info, dict):
        return None
    config = info.get("vllm_config")
    model = config.get("model_config") if isinstance(config, dict) else None
    value = model.get("enable_sleep_mode") if isinstance(model, dict) else None
    return value if isinstance(value, bool) else None


async def check(client: httpx.AsyncClient, cfg: Config, backend: BackendConfig) -> list[Finding]:
    base = backend.upstream.rstrip("/")
    try:
        response = await fetch(client, base + "/version")
    except Unreachable as exc:
        if not backend.command:
            raise
        out = [unreachable(backend, "vllm", str(exc))]  # a managed worker, not started yet
        start = await launch(backend, listening=False)  # what command: would start
        if start is not None and backend.unload_strategy == "vllm":
            dev_env = _flag_env((start.env or {}).get("VLLM_SERVER_DEV_MODE", "0"))
            sleeps = start.flag("--enable-sleep-mode")
            read = {"url": backend.upstream, "kind": "vllm", "devMode": dev_env,
                    "sleepMode": sleeps, "sleepModeFrom": start.where}  # fmt: skip
            out += _verdict(backend, dev_env, sleeps, None, read, how="would start")
        return out
    body = json_of(response)
    version = body.get("version") if isinstance(body, dict) else None
    facts: dict[str, Any] = {"url": backend.upstream, "kind": "vllm", "version": version}
    if response.status_code != 200 or not isinstance(version, str):
        return [
            Finding(
                "vllm",
                "error",
                f"{backend.upstream}/version answers {response.status_code} without a "
                "version: is it vLLM?",
                f"point `upstream:` at vLLM's OpenAI server, or give {backend.name} the "
                "strategy of what runs there",
                backend.name,
                facts,
            )
        ]
    out = [Finding("upstream", "ok", f"vLLM {version} at {backend.upstream}", None,
                   backend.name, dict(facts))]  # fmt: skip
    dev: bool | None = None
    asleep: bool | None = None
    sleep_mode: bool | None = None
    try:
        probe = await fetch(client, base + "/is_sleeping")
        if probe.status_code == 200:
            dev, state = True, json_of(probe)
            asleep = state.get("is_sleeping") if isinstance(state, dict) else None
            info = await fetch(client, base + "/server_info?config_format=json")
            sleep_mode = _sleep_mode(json_of(info)) if info.status_code == 200 else None
        elif probe.status_code == 404:
            dev = False
    except Unreachable:
        pass
    source = "/server_info" if sleep_mode is not None else None
    if sleep_mode is None:
        found = await launch(backend)
        if found is not None and found.mentions("vllm"):
            sleep_mode, source = found.flag("--enable-sleep-mode"), found.where
    facts.update(devMode=dev, sleepMode=sleep_mode, asleep=asleep, sleepModeFrom=source)
    if backend.unload_strategy != "vllm":
        return out
    return out + _verdict(backend, dev, sleep_mode, asleep, facts)


def _flag_env(raw: str) -> bool | None:
    """envs.py reads ``VLLM_SERVER_DEV_MODE`` as ``bool(int(value))``; None: vLLM would fail."""
    try:
        return bool(int(raw))
    except ValueError:
        return None


def _verdict(
    backend: BackendConfig,
    dev: bool | None,
    sleep_mode: bool | None,
    asleep: bool | None,
    facts: dict[str, Any],
    *,
    how: str = "runs",
) -> list[Finding]:
    """What dev mode and sleep mode, as far as known, mean for the ``vllm`` strategy
    (``how``: "runs", or "would start" for a managed worker read from its config)."""
    out: list[Finding] = []
    source = facts.get("sleepModeFrom")
    if dev is False:
        out.append(
            Finding(
                "vllm",
                "error",
                f"vLLM {how} without VLLM_SERVER_DEV_MODE=1: its /sleep and /wake_up answer "
                "404, so gpubroker can never free its memory for another backend",
                f"start vLLM with {BOTH}{OR_PROCESS}",
                backend.name,
                facts,
            )
        )
    if sleep_mode is False:
        out.append(
            Finding(
                "vllm",
                "error",
                f"vLLM {how} without --enable-sleep-mode ({source}): a sleep answers and "
                "/is_sleeping says true, yet no memory is freed, so the next backend's load "
                "can run out of memory",
                f"start vLLM with {BOTH}{OR_PROCESS}",
                backend.name,
                facts,
            )
        )
    elif sleep_mode is None and dev is not False:
        out.append(
            Finding(
                "vllm",
                "warning",
                "whether vLLM runs with --enable-sleep-mode cannot be told from here (no "
                "/server_info, and its command line is not readable): without it a sleep "
                "frees nothing",
                "make sure its command line has --enable-sleep-mode",
                backend.name,
                facts,
            )
        )
    if dev and sleep_mode:
        level = f"sleepLevel {backend.sleep_level}"
        out.append(
            Finding(
                "vllm",
                "ok",
                f"dev mode and sleep mode are on: gpubroker can sleep and wake it ({level})"
                + (", asleep now" if asleep else ""),
                backend=backend.name,
                facts=facts,
            )
        )
    return out
