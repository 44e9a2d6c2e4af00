"""The broker's listening ports, opened and closed while it runs (a reload adds and removes
backends), each behind a :class:`Door`.

A door is what one port serves: the current app of the backend it belongs to, swapped in place
by a reload (connections stay open; a request runs to its end in the app it entered). Each
request is counted against the app it entered, so a replaced or removed app can be waited out;
a door with no app answers ``503 backend_removed`` with ``Retry-After`` while the requests
already in flight finish, and only then does its port close.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from gpubroker.errors import Refused
from gpubroker.proxy.app import answer_lifespan
from gpubroker.proxy.listener import Listener
from gpubroker.responses import send_error
from gpubroker.scheduling.broker import REMOVED
from gpubroker.scheduling.effects import Refuse

log = logging.getLogger("gpubroker.runtime")

Trigger = Callable[[], Awaitable[Any]]
Server = Callable[..., Awaitable[None]]
"""``proxy.listener.serve`` with the broker's bounds: ``(app, listener, trigger, own_headers=)``."""


class Door:
    """The ASGI app on one port: ``app`` (None: refused, the backend is being removed)."""

    def __init__(self, app: Any, backend: str | None = None) -> None:
        self.app = app
        self.backend = backend  # whose port it is (named in the refusal)
        self._counts: dict[int, int] = {}  # id(app) -> requests in flight that entered it
        self._drained: dict[int, anyio.Event] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = self.app
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if app is None:
            await self._refuse(scope, send)
            return
        key = id(app)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        try:
            await app(scope, receive, send)
        finally:
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]
                done = self._drained.pop(key, None)
                if done is not None:
                    done.set()

    async def _refuse(self, scope: Any, send: Any) -> None:
        name = self.backend or "this backend"
        error = Refused.of(Refuse(0, name, 503, "backend_removed", REMOVED.format(name), 5.0))
        prefix = "websocket.http" if scope["type"] == "websocket" else "http"
        await send_error(send, error, prefix=prefix)

    def swap(self, app: Any, backend: str | None = None) -> None:
        """Serve ``app`` (for ``backend``) from the next request on; None refuses them."""
        self.app = app
        if backend is not None:
            self.backend = backend

    def in_flight(self, app: Any | None = None) -> int:
        """Requests in flight (that entered ``app``, when given)."""
        if app is None:
            return sum(self._counts.values())
        return self._counts.get(id(app), 0)

    async def drained(self, app: Any) -> None:
        """Return once no request that entered ``app`` is in flight."""
        while id(app) in self._counts:
            done = self._drained.setdefault(id(app), anyio.Event())
            await done.wait()


@dataclass(slots=True)
class _Port:
    door: Door
    listener: Listener
    stop: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class Ports:
    """Every listening port of one broker, served in ``tg`` by ``server``, keyed by what
    the config calls it (``"status"``, ``"api"``, a backend's ``proxyPort``)."""

    def __init__(self, tg: anyio.abc.TaskGroup, server: Server) -> None:
        self._tg = tg
        self._server = server
        self._ports: dict[Hashable, _Port] = {}
        self.stopping = False

    def __contains__(self, key: Hashable) -> bool:
        return key in self._ports

    def door(self, key: Hashable) -> Door:
        return self._ports[key].door

    def listener(self, key: Hashable) -> Listener:
        return self._ports[key].listener

    def open(
        self, key: Hashable, listener: Listener, door: Door, *, own_headers: bool = False
    ) -> None:
        """Serve ``door`` on ``listener`` (bound already) from now until :meth:`close` or
        :meth:`stop_all`."""
        if self.stopping:  # the broker is stopping: nothing new listens
            listener.sock.close()
            return
        port = self._ports[key] = _Port(door, listener)

        async def run() -> None:
            try:
                with port.scope:
                    try:
                        await self._server(door, listener, port.stop.wait, own_headers=own_headers)
                    except Exception:
                        if not port.scope.cancel_called:
                            raise
                        # cut past its grace: Hypercorn may fail on its way out; the port is shut
                        log.debug("port %s: closed while cut", key, exc_info=True)
            finally:
                port.done.set()
                if self._ports.get(key) is port:
                    del self._ports[key]

        self._tg.start_soon(run)

    async def close(self, key: Hashable, app: Any, grace: float) -> bool:
        """``app`` leaves ``key``'s port: new requests there are refused, those in flight in
        ``app`` get up to ``grace`` seconds to finish, then the port closes (cutting what is
        left), unless a reload gave the port to another app meanwhile. True when nothing was
        cut."""
        port = self._ports.get(key)
        if port is None:
            return True
        door = port.door
        if door.app is app:
            door.swap(None)
        clean = True
        with anyio.move_on_after(grace) as waited:
            await door.drained(app)
        if door.app is not None:  # taken over: the port stays, the app's requests go on
            return not waited.cancel_called
        if waited.cancel_called:
            clean = False
            log.warning("port %s: %d requests cut after %gs", key, door.in_flight(), grace)
        port.stop.set()
        if not clean:
            port.scope.cancel()
        await port.done.wait()
        return clean

    def stop_all(self) -> None:
        """The broker stops: every port stops accepting and drains (the server's grace)."""
        self.stopping = True
        for port in self._ports.values():
            port.stop.set()
