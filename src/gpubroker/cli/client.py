"""A small client for a running broker's status port, used by the CLI's admin commands.

The rule for finding the broker is the same for every command: ``--url``, else
``$GPUBROKER_URL``, else ``http://127.0.0.1:<statusPort>`` of the config (``--config`` or the
usual places), else the default status port.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from gpubroker.config.load import resolve_config
from gpubroker.config.model import DEFAULT_STATUS_PORT
from gpubroker.errors import AdminFailed, BrokerUnreachable, ConfigError, UsageError


def broker_target(
    url: str | None, config: Path | None, token: str | None, env: Mapping[str, str] | None = None
) -> tuple[str, str | None]:
    """The status URL and admin token to use."""
    env = os.environ if env is None else env
    url = url or env.get("GPUBROKER_URL")
    token = token or env.get("GPUBROKER_TOKEN")
    cfg = None
    if config is not None or url is None or token is None:
        try:
            cfg = resolve_config(config, env)
        except ConfigError:
            if config is not None:
                raise  # a config the user named must load
    if url is None:
        port = cfg.status_port if cfg else DEFAULT_STATUS_PORT
        url = f"http://127.0.0.1:{port}"
    else:
        url = _check_url(url)
    if token is None and cfg is not None:
        token = cfg.admin_token
    return url.rstrip("/"), token


def _check_url(url: str) -> str:
    try:
        parts = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UsageError(f"--url {url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.host:
        raise UsageError(
            f"--url {url!r}: expected the broker's status URL, e.g. http://127.0.0.1:5102"
        )
    return url


def call(
    method: str,
    url: str,
    path: str,
    *,
    token: str | None = None,
    json: Any = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """One request to the broker; errors become BrokerUnreachable / AdminFailed. A verb always
    goes as JSON (``{}`` when it has no body): the status port refuses any other content type."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    if json is None and method.upper() not in ("GET", "HEAD"):
        json = {}
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=3.0), trust_env=False) as client:
            response = client.request(method, url + path, json=json, headers=headers)
    except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout) as exc:
        raise AdminFailed(
            f"the broker at {url} did not answer in time ({type(exc).__name__})"
        ) from None
    except httpx.HTTPError as exc:
        raise BrokerUnreachable(
            f"no broker answering at {url} ({type(exc).__name__}); start one with "
            "`gpubroker serve`, or point at it with --url / GPUBROKER_URL"
        ) from None
    try:
        data = response.json()
    except ValueError:
        raise AdminFailed(f"{url}{path} answered {response.status_code} without JSON") from None
    if response.status_code >= 400:
        message = data.get("message") if isinstance(data, dict) else None
        raise AdminFailed(message or f"{url}{path} answered {response.status_code}")
    return data
