"""Serve ASGI apps on sockets we bind ourselves, so callers learn the real port before serving.

Binding first (instead of letting Hypercorn bind) gives two things: a port-0 bind tells the
caller which port it got, with no race between "find a free port" and "listen on it", and a
bind error (port in use, permission) surfaces as an ``OSError`` before anything is started.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

ASGIApp = Callable[..., Awaitable[None]]


@dataclass(slots=True)
class Listener:
    """A bound, listening TCP socket waiting to be handed to Hypercorn."""

    sock: socket.socket
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def listen(host: str = "127.0.0.1", port: int = 0, backlog: int = 1024) -> Listener:
    """Bind and listen now; raises ``OSError`` when the address cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return Listener(sock=sock, host=host, port=int(sock.getsockname()[1]))


async def serve(
    app: Any,
    listener: Listener,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    *,
    graceful_timeout: float = 30.0,
    own_headers: bool = True,
) -> None:
    """Serve ``app`` on ``listener`` until ``shutdown_trigger`` returns, then drain in-flight work.

    Hypercorn takes ownership of the socket. In-flight requests get ``graceful_timeout`` seconds
    to finish after the trigger fires. ``own_headers=False`` leaves out Hypercorn's Date and
    Server headers (for the proxy ports, which pass the upstream's own).
    """
    config = HypercornConfig()
    config.bind = [f"fd://{listener.sock.detach()}"]
    config.graceful_timeout = graceful_timeout
    config.backlog = 1024  # Hypercorn listens again with its own backlog (100 by default)
    # A proxy passes the upstream's Date and Server through; adding ours would duplicate them.
    config.include_date_header = own_headers
    config.include_server_header = own_headers
    config.accesslog = None
    config.errorlog = logging.getLogger("gpubroker.http")
    config.keep_alive_timeout = 75
    config.h11_max_incomplete_size = 64 * 1024
    config.websocket_ping_interval = None
    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)
