"""The ``apiPort`` app (raw ASGI, as the proxy's, since every request passes through it).

``POST`` routes read the body's ``model`` (``body``), pick the backend (``catalogue``) and hand
the request, body replayed, to that backend's :class:`ProxyApp` with this port's error shape;
``/proxy/{backend}/…`` hands anything on with the prefix stripped. The answer gains
``X-GPUBroker-Backend``. The model lists (``/v1/models``, ``/api/tags``, ``/api/ps``) are
answered here.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Mapping
from typing import Any

import anyio
import httpx
from starlette.types import Message, Receive, Scope, Send

from gpubroker.api.body import Read, Replay, boundary_of, read_json, read_multipart, with_length
from gpubroker.api.catalogue import Catalogue, Route, is_ollama
from gpubroker.api.errors import ollama_error, openai_error
from gpubroker.api.keys import ApiKeys
from gpubroker.api.occupancy import Occupancy
from gpubroker.errors import (
    ClientError,
    ClientGone,
    Forbidden,
    MethodNotAllowed,
    ModelForbidden,
    ModelNotFound,
    UnknownBackend,
    UnknownPath,
    UpstreamError,
)
from gpubroker.proxy.app import ProxyApp, answer_lifespan
from gpubroker.responses import ErrorRenderer, json_error

log = logging.getLogger("gpubroker.api.app")

BACKEND_HEADER = b"x-gpubroker-backend"
OPENAI_JSON = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/rerank",
        "/v1/images/generations",
        "/v1/audio/speech",
    }
)
OPENAI_FORM = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
OLLAMA_JSON = frozenset(
    {"/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show"}
)
LIST_TIMEOUT = 5.0  # s: one Ollama backend's /api/tags or /api/ps for the union


class _Tagged:
    """A ``send`` that adds ``X-GPUBroker-Backend`` to the response head."""

    __slots__ = ("_send", "_value")

    def __init__(self, send: Send, backend: str) -> None:
        self._send = send
        self._value = backend.encode()

    async def __call__(self, message: Message) -> None:
        if message["type"] in ("http.response.start", "websocket.http.response.start"):
            message = {**message, "headers": [*message["headers"], (BACKEND_HEADER, self._value)]}
        await self._send(message)


class ApiApp:
    """One endpoint for every model; ``proxies`` are the backends' own proxy apps."""

    def __init__(
        self,
        proxies: Mapping[str, ProxyApp],
        catalogue: Catalogue,
        keys: ApiKeys,
        *,
        body_limit: int,
        client: httpx.AsyncClient,
        occupancy: Occupancy | None = None,
    ) -> None:
        self.proxies = proxies
        self.occupancy = occupancy  # each model's residency in /v1/models, where given
        self.catalogue = catalogue
        self.keys = keys
        self.body_limit = body_limit
        self._client = client
        self._ollama = tuple(b for b in catalogue.backends if is_ollama(b))
        self._ollama_names = tuple(b.name for b in self._ollama)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":  # a lifespan scope has no path
            await answer_lifespan(receive, send)
        elif scope.get("path", "").startswith("/proxy/"):
            await self._by_name(scope, receive, send)
        elif kind == "http":
            await self.http(scope, receive, send)
        elif kind == "websocket":  # only /proxy/{backend}/ carries WebSockets
            await send({"type": "websocket.close", "code": 1008})

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        ollama = path.startswith("/api/")
        errors = ollama_error if ollama else openai_error
        try:
            caller = self.keys.caller(scope["headers"], scope.get("client"))  # or 401
            if path in OPENAI_JSON or path in OLLAMA_JSON or path in OPENAI_FORM:
                if method != "POST":
                    raise MethodNotAllowed(f"{path} takes POST", headers=[(b"allow", b"POST")])
                await self._by_model(scope, receive, send, errors, ollama, caller)
            elif method not in ("GET", "HEAD"):
                raise _no_route(path, method)
            elif path == "/v1/models":
                data = await self._models(caller)
                await _json(send, {"object": "list", "data": data}, method)
            elif path.startswith("/v1/models/"):
                name = path.removeprefix("/v1/models/")
                await _json(send, await self._model(name, caller), method)
            elif path in ("/api/tags", "/api/ps"):
                await _json(send, await self._union(path), method)
            elif path == "/api/version":
                await _json(send, await self._version(), method)
            elif path == "/":
                await _json(send, {"gpubroker": "OpenAI API at /v1, Ollama API at /api"}, method)
            else:
                raise _no_route(path, method)
        except ClientGone:
            return
        except ClientError as error:
            await errors(send, error, error.backend)

    async def _by_model(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        errors: ErrorRenderer,
        ollama: bool,
        caller: str,
    ) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        boundary = boundary_of(headers) if scope["path"] in OPENAI_FORM else None
        read: Read
        if boundary is not None:
            read = await read_multipart(receive, self.body_limit, boundary)
        else:
            field = "name" if scope["path"] == "/api/show" else "model"
            read = await read_json(receive, self.body_limit, field)
        route = await self._resolve(read.model, caller, self._ollama_names if ollama else None)
        if not self._allows(caller, read.model, route):
            raise ModelForbidden(f"this key may not use the model {read.model!r}")
        headers = self._for_upstream(headers)
        head = read.head
        if route.upstream != read.model:
            head = read.rewritten(route.upstream)
            headers = with_length(headers, len(head) - len(read.head))
        scope = {**scope, "headers": headers}
        tagged = _Tagged(send, route.backend)
        await self.proxies[route.backend].http(
            scope,
            Replay(head, read.more, receive),
            tagged,
            errors=errors,
            caller=caller,
            model=route.model,
        )

    async def _by_name(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/proxy/{backend}/rest``: that backend's proxy port, as if asked directly."""
        path: str = scope["path"]
        name, _, rest = path.removeprefix("/proxy/").partition("/")
        try:  # a key opens every route of this port, /proxy/ included
            caller = self.keys.caller(scope["headers"], scope.get("client"))
            if self.keys.limited(caller):
                raise Forbidden(
                    "this key may use only some models, which /proxy/ cannot check: use the "
                    "/v1 or /api routes"
                )
        except ClientError as denied:
            if scope["type"] == "http":
                await json_error(send, denied, None)
            elif scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        raw: bytes = scope.get("raw_path") or path.encode()
        prefix = b"/proxy/" + name.encode()
        stripped = raw[len(prefix) :] if raw.startswith(prefix) else b"/" + rest.encode()
        app = self.proxies.get(name)
        if stripped[:1] not in (b"", b"/"):  # an encoded "/" in the name: /proxy/a%2Fb/
            app = None
            name = urllib.parse.unquote(raw.removeprefix(b"/proxy/").partition(b"/")[0].decode())
        if app is None:
            if scope["type"] == "http":
                await json_error(send, UnknownBackend(f"no backend named {name!r}"), None)
            elif scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        inner = {
            **scope,
            "path": "/" + rest,
            "raw_path": stripped or b"/",
            "headers": self._for_upstream(scope["headers"]),
        }
        if scope["type"] == "http":
            await app.http(inner, receive, _Tagged(send, name), caller=caller)
        else:
            await app(inner, receive, _Tagged(send, name))

    def _for_upstream(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """``headers`` less the client's API key, when this port takes keys: the key must not
        reach the upstream's logs, nor clash with an upstream's own ``--api-key``."""
        if not self.keys.names:
            return headers
        return [(k, v) for k, v in headers if k != b"authorization"]

    def _allows(self, caller: str, name: str, route: Route) -> bool:
        """Whether ``caller`` may use ``route`` (asked for as ``name``), by any of its names."""
        return self.keys.allows(
            caller, route.model, aliases=(name, route.alias_of or route.model, route.upstream)
        )

    async def _resolve(self, name: str, caller: str, among: tuple[str, ...] | None) -> Route:
        """The route for ``name``; a key limited to some models hears of no other."""
        try:
            return await self.catalogue.resolve(name, among)
        except ModelNotFound:
            if not self.keys.limited(caller):
                raise
        near = [
            n
            for n in self.catalogue.closest(name, among)
            if any(self._allows(caller, n, r) for r in self.catalogue.routes(n, among))
        ]
        hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        known = "" if near else " (GET /v1/models lists every model)"
        raise ModelNotFound(f"the model {name!r} is served by no backend{hint}{known}")

    async def _models(self, caller: str) -> list[dict[str, Any]]:
        listing = await self.catalogue.listing()
        return [
            _model_entry(name, route, ok, self.occupancy)
            for name, route, ok in listing
            if self._allows(caller, name, route)
        ]

    async def _model(self, name: str, caller: str) -> dict[str, Any]:
        route = await self._resolve(name, caller, None)
        if not self._allows(caller, name, route):  # as unknown: a key hears of no other
            raise ModelNotFound(f"the model {name!r} is served by no backend")
        return _model_entry(name, route, self.catalogue.reachable(route.backend), self.occupancy)

    async def _union(self, path: str) -> dict[str, Any]:
        """Ollama's model list (``/api/tags``) or loaded list (``/api/ps``) over every Ollama
        backend, each model once (the first backend in config order names it)."""
        answers: dict[str, Any] = {}

        async def read(name: str, upstream: str) -> None:
            try:
                with anyio.fail_after(LIST_TIMEOUT):
                    response = await self._client.get(upstream + path)
                response.raise_for_status()
                answers[name] = response.json()
            except (httpx.HTTPError, TimeoutError, ValueError) as exc:
                log.debug("%s: %s unreadable: %s", name, path, exc)

        async with anyio.create_task_group() as tg:
            for b in self._ollama:
                tg.start_soon(read, b.name, b.upstream)
        if self._ollama and not answers:
            raise UpstreamError(f"no Ollama backend answered {path}")
        models: dict[str, Any] = {}
        for b in self._ollama:
            for item in (answers.get(b.name) or {}).get("models") or ():
                if isinstance(item, dict):
                    models.setdefault(str(item.get("name") or item.get("model")), item)
        return {"models": list(models.values())}

    async def _version(self) -> dict[str, Any]:
        for b in self._ollama:
            try:
                with anyio.fail_after(LIST_TIMEOUT):
                    response = await self._client.get(b.upstream + "/api/version")
                if response.status_code == 200:
                    data: dict[str, Any] = response.json()
                    return data
            except (httpx.HTTPError, TimeoutError, ValueError):
                continue
        return {"version": "0.0.0"}


def _model_entry(
    name: str, route: Route, reachable: bool, occupancy: Occupancy | None = None
) -> dict[str, Any]:
    """OpenAI's model object, and ours under ``gpubroker``: the backend, whether it answers,
    and (``occupancy``) whether the model is resident and how many wait for it."""
    info: dict[str, Any] = {"backend": route.backend, "reachable": reachable}
    if route.alias_of is not None:
        info["aliasOf"] = route.alias_of
    if occupancy is not None:
        info.update(occupancy.of(route))
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": route.backend,
        "gpubroker": info,
    }


def _no_route(path: str, method: str) -> ClientError:
    return UnknownPath(
        f"no route {method} {path} here: the OpenAI API is under /v1, Ollama's under /api, "
        "and /proxy/{backend}/ reaches a backend by name"
    )


async def _json(send: Send, data: Any, method: str = "GET") -> None:
    """``data`` as a 200 answer; to a HEAD, its head only."""
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
