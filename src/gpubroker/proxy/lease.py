"""``LeaseBroker``: all the proxy asks of the scheduling side, as one interface.

The proxy takes a lease for a GPU request and reports what the broker counts and shows
(passthroughs, upstream failures, a GPU response's first byte); nothing else crosses. The
broker (``gpubroker.scheduling.broker.Broker``) satisfies it structurally, so the proxy never
imports ``scheduling``, and a test can hand ProxyApp a fake.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class SwapNote(Protocol):
    """The swap a lease waited for, as the ``X-GPUBroker-Swap`` header tells it."""

    def header(self) -> str: ...


class Lease(Protocol):
    """An admitted lease: its id, how long it queued and the swap that made room, if any."""

    @property
    def lease(self) -> int: ...
    @property
    def queued_s(self) -> float: ...
    @property
    def swap(self) -> SwapNote | None: ...


class LeaseBroker(Protocol):
    def lease(
        self,
        backend: str,
        path: str = "",
        *,
        method: str = "POST",
        caller: str | None = None,
        model: str | None = None,
        body: bytes | None = None,
        on_queued: Callable[[int], None] | None = None,
    ) -> AbstractAsyncContextManager[Lease]:
        """Hold the GPU for ``backend`` inside the ``async with``; may queue. Raises
        :class:`gpubroker.errors.Refused` when refused. ``caller`` (who asks) and ``model``
        (where known) are shown with the lease. ``body``: the request's whole body where
        :meth:`wants_body` asked for it (None: not read, or past the read-ahead bound).
        ``on_queued(id)``: called (at once, from inside the call) only when the lease is not
        admitted at once, or waits after its admission (a crashed worker's restart), once."""
        ...

    def wants_body(self, backend: str) -> bool:
        """Whether a GPU request for ``backend`` should bring its body to :meth:`lease` (its
        strategy sizes requests by what they ask for)."""
        ...

    def progress(self, lease: int) -> str | None:
        """What the queued lease ``lease`` waits for (``queued 2nd behind comfyui``), for the
        client's SSE comments; None once it waits no more."""
        ...

    def first_byte(self, lease: int) -> None:
        """The first body byte of ``lease``'s response went to the client."""
        ...

    def record_passthrough(self, backend: str) -> None:
        """A request that needed no lease was forwarded."""
        ...

    def record_upstream_error(self, backend: str) -> None:
        """The upstream failed a request (unreachable, timed out, malformed, broke off)."""
        ...
