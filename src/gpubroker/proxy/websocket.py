"""WebSocket passthrough (ComfyUI's ``/ws?clientId=…`` is the case that matters).

Bidirectional, text and binary, close codes propagated both ways. WebSockets never take a GPU
lease: the work they report on was leased by the HTTP request that queued it.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import anyio
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import HeadersLike
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from gpubroker.config.model import BackendConfig
from gpubroker.proxy.forwarding import request_headers, sent_host

log = logging.getLogger("gpubroker.ws")


class _SameHost(ClientConnection):
    """A client connection that sends the Host it is given instead of the one in the URL.

    websockets derives Host from the URL and *adds* any given one beside it; a transparent
    proxy must send exactly the client's (see forwarding.py), so the derived one goes.
    """

    async def handshake(
        self, additional_headers: HeadersLike | None = None, user_agent_header: str | None = None
    ) -> None:
        derive = self.protocol.connect

        def connect_with_given_host() -> Any:
            request = derive()
            del request.headers["Host"]
            return request

        self.protocol.connect = connect_with_given_host  # type: ignore[method-assign]
        await super().handshake(additional_headers, user_agent_header)


async def proxy_websocket(
    backend: BackendConfig, scope: Scope, receive: Receive, send: Send
) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    base = backend.upstream.replace("https://", "wss://").replace("http://", "ws://")
    target = scope.get("raw_path") or scope["path"].encode()
    url = base + target.decode("latin-1").split("?", 1)[0]
    if scope.get("query_string"):
        url += "?" + scope["query_string"].decode("latin-1")
    forwarded = request_headers(scope, sent_host(backend), websocket=True)
    if not any(k == b"host" for k, _ in forwarded):  # a client that sent none
        forwarded.append((b"host", urlsplit(backend.upstream).netloc.encode()))
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in forwarded]
    try:
        upstream = await connect(
            url,
            additional_headers=headers,
            subprotocols=scope.get("subprotocols") or None,
            create_connection=_SameHost,
            proxy=None,  # the upstream is reached directly, as upstream.py does
            user_agent_header=None,  # the client's own User-Agent passes through
            max_size=None,
            ping_interval=None,
            open_timeout=10,
            compression=None,
        )
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        status = exc.response.status_code if isinstance(exc, InvalidStatus) else 502
        log.info("%s: websocket upstream refused %s: %s", backend.name, url, exc)
        await send({"type": "websocket.close", "code": 1011 if status >= 500 else 1008})
        return
    async with upstream:
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        async with anyio.create_task_group() as tg:
            tg.start_soon(_client_to_upstream, receive, upstream, tg.cancel_scope)
            tg.start_soon(_upstream_to_client, upstream, send, tg.cancel_scope)


async def _client_to_upstream(
    receive: Receive, upstream: ClientConnection, scope: anyio.CancelScope
) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            # Hypercorn 0.18 reports every client close as 1006 (it drops the client's code),
            # so the client's own code reaches us only where the server passes it on.
            code = message.get("code", 1000)
            await upstream.close(code=code if code not in (1005, 1006) else 1000)
            scope.cancel()
            return
        try:
            if message.get("bytes") is not None:
                await upstream.send(message["bytes"])
            elif message.get("text") is not None:
                await upstream.send(message["text"])
        except ConnectionClosed:
            return  # the other direction reports the close


async def _upstream_to_client(
    upstream: ClientConnection, send: Send, scope: anyio.CancelScope
) -> None:
    try:
        async for data in upstream:
            if isinstance(data, bytes):
                await send({"type": "websocket.send", "bytes": data})
            else:
                await send({"type": "websocket.send", "text": data})
    except ConnectionClosed:
        pass
    code = upstream.close_code if upstream.close_code is not None else 1011
    reason = upstream.close_reason or ""
    if code in (1005, 1006):  # no status / abnormal: not valid on the wire, say "normal"
        code = 1000
    await send({"type": "websocket.close", "code": code, "reason": reason})
    scope.cancel()
