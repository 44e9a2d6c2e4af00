"""What the builtin strategies share: a JSON call that fails loudly, and the confirmation poll.

The broker bounds every strategy call with ``unloadTimeout``, so the poll below simply polls
until done.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx

from gpubroker.errors import StrategyFailed
from gpubroker.plugins.strategies.base import FIRST_POLL

POLL_INTERVAL = 0.02  # seconds between confirmation polls at most: a swap waits on them


async def poll_until(done: Callable[[], Awaitable[bool]]) -> None:
    """Check ``done`` now and again until it is true, soon at first, then every POLL_INTERVAL.

    A confirmation poll is what a swap waits on beyond the service's own work, so its gap is
    the swap's overhead; the broker bounds the whole wait with its own timeout.
    """
    delay = FIRST_POLL
    while not await done():
        await anyio.sleep(delay)
        delay = min(delay * 2, POLL_INTERVAL)


async def json_call(client: httpx.AsyncClient, method: str, url: str, **kwargs: Any) -> Any:
    """The JSON answer of ``method url`` (None when empty); StrategyFailed on >= 400 or non-JSON."""
    response = await client.request(method, url, **kwargs)
    if response.status_code >= 400:
        raise StrategyFailed(
            f"{method} {url} answered {response.status_code}: {response.text[:200]}"
        )
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise StrategyFailed(f"{method} {url} answered non-JSON: {response.text[:200]}") from None
