"""Who may talk to our own listeners: a Host allow-list and an Origin check, as ASGI middleware.

A browser is the one client that can be made to send requests it did not mean: any web page may
POST to ``http://127.0.0.1:<port>`` as a "simple request" (``text/plain``, no CORS preflight),
and a page on a name its attacker re-points at 127.0.0.1 (DNS rebinding) may even read the
answers, since the browser then counts the port as the page's own origin. Ollama answers this
with a Host allow-list (server/routes.go, ``allowedHostsMiddleware``); this is the same idea,
for the status/admin port now and for any later listener of ours (the API port, a dashboard):

- **Host**: only names this listener answers to (:class:`HostPolicy`); anything else is 403
  ``forbidden_host``, before any route runs, reads included. A rebinding page always sends its
  own name, so it stops here.
- **Origin**: a request that may change state (anything but GET, HEAD, OPTIONS) and every
  WebSocket handshake carrying a foreign ``Origin`` is 403 ``forbidden_origin``. Browsers send
  Origin on every cross-origin POST; the CLI, curl and scripts send none and pass.
- **Preflight**: ``OPTIONS`` with ``Access-Control-Request-Method`` is 403 ``cors_refused``.
  A 204 without ``Access-Control-Allow-*`` headers would fail the browser's check just as well,
  but reads like success to a person looking at the network tab or at curl; 403 says plainly
  that no cross-origin call is allowed. No response ever carries an ``Access-Control-Allow-*``
  header: the guard drops any that an app behind it sets.
- **JSON only** (``json_only``): state-changing requests must say ``Content-Type:
  application/json`` (415 otherwise), which no simple request can. That is a second lock on
  the same door as the Origin check.

Proxy ports do not use this: they are transparent and leave such checks to the service.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpubroker.config.hosts import allowed_host_entry, ip_literal, is_loopback, split_host
from gpubroker.errors import (
    BadRequest,
    ClientError,
    CorsRefused,
    ForbiddenHost,
    ForbiddenOrigin,
    UnsupportedMediaType,
)
from gpubroker.responses import send_error

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class HostPolicy:
    """The Host names one listener answers to.

    Always: its bind address, the loopback names and addresses, and the ``allowedHosts``
    entries. When it binds beyond loopback (0.0.0.0, ::, a LAN address) also the machine's own
    hostname (and ``<hostname>.local``, its mDNS name) and any IP literal. An IP literal cannot
    be rebound: a page that sends ``Host: 10.0.0.5`` was itself loaded from 10.0.0.5, so it
    proves nothing foreign. Ollama skips its Host check altogether on such binds; we keep the
    names strict, so a rebinding page is refused there too.
    """

    def __init__(self, bind: str, allowed: Iterable[str] = (), hostname: str | None = None) -> None:
        self.bind = bind.lower().strip("[]")
        self.beyond_loopback = not is_loopback(self.bind)
        names = {allowed_host_entry(a) for a in allowed}
        self.exact = {n for n in names if not n.startswith("*.")} | {self.bind}
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))  # ".lan"
        if self.beyond_loopback:
            own = (hostname if hostname is not None else socket.gethostname()).lower()
            if own:
                self.exact |= {own, f"{own}.local"}

    def names(self, name: str) -> bool:
        """``name`` is one this listener answers to by name (IP literals only if loopback,
        bound or listed)."""
        return is_loopback(name) or name in self.exact or name.endswith(self.suffixes)

    def allows(self, name: str) -> bool:
        """The Host check: an empty Host (HTTP/1.0, which no browser sends) is allowed too."""
        if not name or self.names(name):
            return True
        return self.beyond_loopback and ip_literal(name) is not None

    def same_origin(
        self, origin: str, host: tuple[str, int | None], listener_port: int | None
    ) -> bool:
        """``origin`` is this listener: the scheme's host and port are those the request was
        sent to (its Host), or a name this listener answers to with the listener's own port."""
        try:
            parts = urlsplit(origin.strip())
            port = parts.port
        except ValueError:
            return False
        name = (parts.hostname or "").rstrip(".")
        if parts.scheme not in _DEFAULT_PORTS or not name or "@" in parts.netloc:
            return False
        if parts.path or parts.query or parts.fragment:
            return False
        effective = port if port is not None else _DEFAULT_PORTS[parts.scheme]
        host_name, host_port = host
        # no port in Host means the scheme's default, so then the Origin names none either
        same_port = effective == host_port or (host_port is None and port is None)
        if name == host_name and same_port:
            return True
        return self.names(name) and effective == listener_port


class ListenerGuard:
    """ASGI middleware for one of our own listeners: Host, preflight, Origin and content type,
    in that order, before ``app`` sees the request. See the module docstring for why."""

    def __init__(self, app: ASGIApp, policy: HostPolicy, *, json_only: bool = False) -> None:
        self.app = app
        self.policy = policy
        self.json_only = json_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        refusal = self._check(scope)
        if refusal is not None:
            if kind == "websocket":  # closing before accepting answers the handshake with 403
                await send({"type": "websocket.close", "code": 1008, "reason": refusal.code})
            else:
                await send_error(send, refusal)
            return

        async def send_without_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if not k.lower().startswith(b"access-control-allow-")
                ]
            await send(message)

        await self.app(scope, receive, send_without_cors)

    def _check(self, scope: Scope) -> ClientError | None:
        headers: dict[bytes, list[str]] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.lower(), []).append(value.decode("latin-1"))
        hosts = headers.get(b"host", [""])
        host = split_host(hosts[0]) if len(hosts) == 1 else None
        if host is None:
            return BadRequest("the request needs one well-formed Host header")
        if not self.policy.allows(host[0]):
            shown = f"[{host[0]}]" if ":" in host[0] else host[0]
            return ForbiddenHost(
                f"this port does not answer to the name {shown!r}: to reach the broker by it, "
                f"add {host[0]!r} to allowedHosts in the config"
            )
        method = scope.get("method", "GET")
        if method == "OPTIONS" and b"access-control-request-method" in headers:
            return CorsRefused("cross-origin requests are not allowed on this port")
        if scope["type"] == "websocket" or method not in SAFE_METHODS:
            origins = headers.get(b"origin")
            server = scope.get("server")
            port = int(server[1]) if server else None
            if origins is not None and (
                len(origins) != 1 or not self.policy.same_origin(origins[0], host, port)
            ):
                return ForbiddenOrigin(
                    f"a page from {origins[0]!r} may not act on this port; use the gpubroker "
                    "CLI or call it from a script (they send no Origin)"
                )
        if self.json_only and scope["type"] == "http" and method not in SAFE_METHODS:
            types = headers.get(b"content-type", [])
            media = types[0].split(";", 1)[0].strip().lower() if len(types) == 1 else ""
            if media != "application/json":
                return UnsupportedMediaType(
                    "admin verbs take a JSON body: send Content-Type: application/json"
                )
        return None
