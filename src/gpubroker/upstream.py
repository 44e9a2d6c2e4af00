"""The proxy's connection to one upstream: a pooled keep-alive HTTP/1.1 client.

Kept behind a small interface (``open`` → status, headers, body iterator) so the data path's
client can be chosen by measurement (see ``bench/proxy.py``) without touching the proxy.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import anyio
import httpx


class UpstreamError(Exception):
    """The upstream could not be reached, or broke the connection."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not send response headers in time."""


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    _response: httpx.Response

    async def body(self) -> AsyncIterator[bytes]:
        """The body bytes as they arrive; raises UpstreamError if the upstream breaks off."""
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            ) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class Upstream:
    """One pooled client per upstream base URL."""

    def __init__(
        self, base_url: str, *, response_timeout: float = 600.0, max_connections: int = 512
    ) -> None:
        self.base_url = httpx.URL(base_url)
        self.response_timeout = response_timeout
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=10.0, read=None, write=None, pool=None),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            trust_env=False,
            follow_redirects=False,
        )
        for default in ("accept", "accept-encoding", "connection", "user-agent"):
            del self._client.headers[default]  # forward what the client sent, nothing more

    async def open(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: AsyncIterable[bytes] | None,
    ) -> UpstreamResponse:
        url = self.base_url.copy_with(raw_path=target)
        request = self._client.build_request(method, url, headers=headers, content=body)
        try:
            with anyio.fail_after(self.response_timeout):
                response = await self._client.send(request, stream=True)
        except TimeoutError:
            raise UpstreamTimeout(
                f"no response from {self.base_url} within {self.response_timeout:g}s"
            ) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"{self.base_url} unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        return UpstreamResponse(response.status_code, list(response.headers.raw), response)

    async def aclose(self) -> None:
        await self._client.aclose()
