"""Each upstream: reachable, what it is and its version, and whether it agrees with its strategy.

What a backend is follows its strategy (``ollama``, ``vllm``, ``comfyui``), else its classifier
(``llamacpp``), else it is probed as any HTTP service (``healthPath``, else ``/``). Every request
is bounded by the client's timeout, and a service that does not answer its first probe gets no
second, so a dead upstream costs one timeout at most. A managed worker (``command:``) that is
not running is no error: gpubroker starts it on demand.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import anyio.to_thread
import httpx

from gpubroker.config.model import BackendConfig, Config
from gpubroker.doctor.findings import Finding
from gpubroker.doctor.local import Launch, launch_of

NAMES = {"ollama": "Ollama", "vllm": "vLLM", "comfyui": "ComfyUI", "llamacpp": "llama-server"}
MAX_BODY = 2**20  # bytes of an answer read: every probe's JSON is a few KiB; a page is cut here


class Unreachable(Exception):
    """The upstream did not answer an HTTP request: refused, reset, timed out."""


async def fetch(client: httpx.AsyncClient, url: str) -> httpx.Response:
    """``GET url``, its body read up to :data:`MAX_BODY` (an upstream that sends without end
    costs a bounded read, then the connection is closed)."""
    try:
        async with client.stream("GET", url) as streamed:
            body = bytearray()
            async for chunk in streamed.aiter_bytes():
                body += chunk
                if len(body) >= MAX_BODY:
                    del body[MAX_BODY:]
                    break
            drop = ("content-encoding", "content-length", "transfer-encoding")
            headers = [(k, v) for k, v in streamed.headers.items() if k.lower() not in drop]
            return httpx.Response(
                streamed.status_code, headers=headers, content=bytes(body), request=streamed.request
            )
    except httpx.TimeoutException:
        raise Unreachable("did not answer in time") from None
    except httpx.ConnectError:
        raise Unreachable("cannot connect: nothing listens there, or it is not reachable") from None
    except httpx.HTTPError as exc:
        raise Unreachable(str(exc) or type(exc).__name__) from None


def json_of(response: httpx.Response) -> Any:
    """The answer's JSON, None when it is not strict JSON (``NaN``, which Python's parser
    takes, would make ``--json`` unreadable where a fact quotes it)."""
    try:
        return json.loads(response.content, parse_constant=_not_json)
    except ValueError:  # UnicodeDecodeError included
        return None
    except RecursionError:
        return None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def kind_of(backend: BackendConfig) -> str:
    """What the doctor probes the upstream as."""
    if backend.unload_strategy in ("ollama", "vllm", "comfyui"):
        return backend.unload_strategy
    if backend.classifier_name == "llamacpp":
        return "llamacpp"
    return "generic"


async def launch(backend: BackendConfig, *, listening: bool = True) -> Launch | None:
    """:func:`~gpubroker.doctor.local.launch_of` in a thread."""
    find = functools.partial(launch_of, backend, listening=listening)
    return await anyio.to_thread.run_sync(find, abandon_on_cancel=True)


def unreachable(backend: BackendConfig, kind: str, why: str) -> Finding:
    facts = {"url": backend.upstream, "kind": kind, "reachable": False}
    if backend.command:
        auto = " (autostart: it should be running)" if backend.autostart else ""
        return Finding(
            "upstream",
            "warning" if backend.autostart else "info",
            f"{backend.upstream} is not answering ({why}): a managed worker, started on the "
            f"first request that needs it{auto}",
            "`gpubroker workers start " + backend.name + "` starts it now"
            if backend.autostart
            else None,
            backend.name,
            facts,
        )
    return Finding(
        "upstream",
        "error",
        f"{backend.upstream} is not answering ({why}): every request to {backend.name} will fail",
        f"start {NAMES.get(kind, 'the service')}, or point {backend.name}'s `upstream:` at "
        "where it listens",
        backend.name,
        facts,
    )


async def check_backend(
    client: httpx.AsyncClient, cfg: Config, backend: BackendConfig
) -> list[Finding]:
    """Everything about one backend's upstream; one request first, the rest only if it answers."""
    from gpubroker.doctor import comfyui, ollama, vllm

    kind = kind_of(backend)
    probe = {
        "ollama": ollama.check,
        "vllm": vllm.check,
        "comfyui": comfyui.check,
        "llamacpp": check_llamacpp,
    }.get(kind, check_generic)
    try:
        return await probe(client, cfg, backend)
    except Unreachable as exc:
        return [unreachable(backend, kind, str(exc))]


async def check_generic(
    client: httpx.AsyncClient, _cfg: Config, backend: BackendConfig
) -> list[Finding]:
    path = backend.health_path or "/"
    response = await fetch(client, backend.upstream.rstrip("/") + path)
    facts = {"url": backend.upstream, "kind": "generic", "status": response.status_code}
    if response.status_code >= 500:
        return [
            Finding(
                "upstream",
                "warning",
                f"{backend.upstream}{path} answers {response.status_code}",
                "look at the service's own log",
                backend.name,
                facts,
            )
        ]
    return [
        Finding(
            "upstream",
            "ok",
            f"{backend.upstream} answers (GET {path} -> {response.status_code})",
            backend=backend.name,
            facts=facts,
        )
    ]


async def check_llamacpp(
    client: httpx.AsyncClient, _cfg: Config, backend: BackendConfig
) -> list[Finding]:
    """llama.cpp's server: ``GET /health`` (200, or 503 while its model loads) and ``GET
    /props`` (``build_info``, ``model_path``), as tools/server/server.cpp serves them."""
    base = backend.upstream.rstrip("/")
    health = await fetch(client, base + "/health")
    facts: dict[str, Any] = {"url": backend.upstream, "kind": "llamacpp"}
    facts["status"] = health.status_code
    try:
        props = json_of(await fetch(client, base + "/props"))
    except Unreachable:
        props = None
    if isinstance(props, dict):
        facts.update(version=props.get("build_info"), model=props.get("model_path"))
    what = f"llama.cpp server {facts.get('version') or '(version unknown)'}"
    if health.status_code == 503:
        return [
            Finding(
                "llamacpp",
                "info",
                f"{what} at {backend.upstream} is still loading its model (/health 503)",
                backend=backend.name,
                facts=facts,
            )
        ]
    if health.status_code == 404:  # not llama.cpp's own server (llama-cpp-python has none)
        models = await fetch(client, base + "/v1/models")
        facts["status"] = models.status_code
        if models.status_code == 200:
            return [
                Finding(
                    "llamacpp",
                    "ok",
                    f"{backend.upstream} answers /v1/models but has no /health: an "
                    "OpenAI-compatible server other than llama.cpp's (llama-cpp-python?)",
                    backend=backend.name,
                    facts=facts,
                )
            ]
    if health.status_code >= 400:
        return [
            Finding(
                "llamacpp",
                "warning",
                f"{backend.upstream}/health answers {health.status_code}: is it llama.cpp's "
                "server?",
                "point `upstream:` at llama-server, or drop `classifier: llamacpp`",
                backend.name,
                facts,
            )
        ]
    model = f", model {facts['model']}" if facts.get("model") else ""
    return [
        Finding(
            "llamacpp",
            "ok",
            f"{what} at {backend.upstream}{model}",
            backend=backend.name,
            facts=facts,
        )
    ]
