"""What a transparent proxy changes in the headers it passes on, and what it must not change.

One place for both directions and both protocols (HTTP and WebSocket upgrades): hop-by-hop
headers are dropped (RFC 9110 §7.6.1, plus any that ``Connection`` names), ``X-Forwarded-*`` is
added, and the client's ``Host`` is kept. Keeping Host is what nginx's
``proxy_set_header Host $host`` and Node's http-proxy do, and it matters: services compare Host
with the browser's ``Origin`` to refuse cross-site requests (ComfyUI answers 403 on a loopback
address when they differ), so a proxy that rewrites one and not the other breaks every page
loaded through it. A backend with ``hostHeader: upstream`` gets the upstream's own host instead
(name-based virtual hosts, TLS with SNI); the client's stays in ``X-Forwarded-Host``. A
strategy may make ``upstream`` its backends' default (``Strategy.host_header``): Ollama does,
since its Host allow-list refuses names it does not know.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from starlette.types import Scope

    from gpubroker.config.model import BackendConfig

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via"})
VIA = b"1.1 gpubroker"  # our Via entry (RFC 9110 §7.6.3): a pseudonym, the same on every broker
MAX_HOPS = 4  # a request that already passed this many brokers is in a loop (508)
WEBSOCKET_HANDSHAKE = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
    }
)


def sent_host(backend: BackendConfig) -> bytes | None:
    """The Host to send in place of the client's: the upstream's own under ``hostHeader:
    upstream``, else None (the client's goes through)."""
    if backend.host_header != "upstream":
        return None
    return urlsplit(backend.upstream).netloc.encode()


def hop_by_hop(headers: Headers) -> frozenset[bytes]:
    """The standard hop-by-hop names plus every name the ``Connection`` header lists."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return HOP_BY_HOP | named


def request_headers(
    scope: Scope, upstream_host: bytes | None, *, websocket: bool = False
) -> Headers:
    """The client's headers as the upstream should see them.

    Hop-by-hop headers go, ``X-Forwarded-For`` is appended to (never trusted), ``-Proto`` and
    ``-Host`` are set, and ``Via`` gets our entry (appended, so a loop can be counted: see
    :func:`via_hops`). ``Host`` is the client's unless ``upstream_host`` is given (the
    backend's ``hostHeader: upstream``); a client that sent none gets ``upstream_host`` or the
    caller's default. For a WebSocket upgrade the handshake's own headers are left out too:
    the upstream connection negotiates its own key, version and extensions.
    """
    raw: Headers = scope["headers"]
    drop = hop_by_hop(raw) | FORWARDED | {b"host"}
    if websocket:
        drop |= WEBSOCKET_HANDSHAKE
    out = [(k, v) for k, v in raw if k.lower() not in drop]
    host = next((v for k, v in raw if k.lower() == b"host"), b"")
    prior = b", ".join(v for k, v in raw if k.lower() == b"x-forwarded-for")
    via = b", ".join(v for k, v in raw if k.lower() == b"via")
    client = (scope.get("client") or ("", 0))[0].encode()
    forwarded_for = prior + b", " + client if prior else client
    sent_host = upstream_host if upstream_host is not None else host
    if sent_host:
        out.append((b"host", sent_host))
    out += [
        (b"x-forwarded-for", forwarded_for),
        (b"x-forwarded-proto", scope.get("scheme", "http").encode()),
        (b"via", via + b", " + VIA if via else VIA),
    ]
    if host:
        out.append((b"x-forwarded-host", host))
    return out


def via_hops(headers: Headers) -> int:
    """How many gpubroker hops the request's ``Via`` already lists (``1.1 gpubroker`` entries).

    A config loop (two brokers pointing at each other, or DNS sending a broker's upstream back
    to itself) otherwise forwards one request until the pool and file descriptors run out.
    """
    hops = 0
    for name, value in headers:
        if name.lower() == b"via":
            for entry in value.split(b","):
                parts = entry.split()
                if len(parts) >= 2 and parts[1] == b"gpubroker":
                    hops += 1
    return hops


def response_headers(headers: Headers) -> Headers:
    """The upstream's response headers minus hop-by-hop ones."""
    drop = hop_by_hop(headers)
    return [(k, v) for k, v in headers if k.lower() not in drop]
