"""The upstream clients ``bench/proxy.py --compare`` puts in place of gpubroker's own: the old
httpx one and aiohttp's, behind the same interface (``gpubroker.proxy.upstream.Upstream``)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import anyio

# --- the old httpx client, for comparison only ----------------------------------------------


def httpx_upstream_class() -> type:
    """gpubroker's former upstream client (httpx), behind the same interface."""
    import httpx

    from gpubroker.errors import UpstreamError, UpstreamTimeout

    @dataclass(slots=True)
    class Response:
        status: int
        headers: list[tuple[bytes, bytes]]
        _response: httpx.Response

        async def body(self) -> AsyncIterator[bytes]:
            try:
                async for chunk in self._response.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                raise UpstreamError(str(exc)) from exc

        def buffered_body(self) -> bytes | None:
            return None

        async def aclose(self) -> None:
            await self._response.aclose()

    class HttpxUpstream:
        def __init__(self, base_url: str, *, response_timeout: float = 600.0) -> None:
            self.base_url = httpx.URL(base_url)
            self.response_timeout = response_timeout
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(connect=10.0, read=None, write=None, pool=None),
                limits=httpx.Limits(max_connections=512, max_keepalive_connections=512),
                trust_env=False,
            )
            for default in ("accept", "accept-encoding", "connection", "user-agent"):
                del self._client.headers[default]

        async def open(
            self,
            method: str,
            target: bytes,
            headers: list[tuple[bytes, bytes]],
            body: AsyncIterable[bytes] | None,
        ) -> Response:
            url = self.base_url.copy_with(raw_path=target)
            request = self._client.build_request(method, url, headers=headers, content=body)
            try:
                with anyio.fail_after(self.response_timeout):
                    response = await self._client.send(request, stream=True)
            except TimeoutError:
                raise UpstreamTimeout("timeout") from None
            except httpx.HTTPError as exc:
                raise UpstreamError(f"{self.base_url} unreachable: {exc}") from exc
            return Response(response.status_code, list(response.headers.raw), response)

        async def aclose(self) -> None:
            await self._client.aclose()

    return HttpxUpstream


def aiohttp_upstream_class() -> type:
    """aiohttp's client behind the same interface (install aiohttp to compare)."""
    import aiohttp
    from multidict import CIMultiDict
    from yarl import URL

    from gpubroker.errors import UpstreamError, UpstreamTimeout

    @dataclass(slots=True)
    class Response:
        status: int
        headers: list[tuple[bytes, bytes]]
        _response: aiohttp.ClientResponse

        async def body(self) -> AsyncIterator[bytes]:
            try:
                async for chunk in self._response.content.iter_any():
                    yield chunk
            except aiohttp.ClientError as exc:
                raise UpstreamError(str(exc)) from exc

        def buffered_body(self) -> bytes | None:
            return None

        async def aclose(self) -> None:
            self._response.release()

    class AiohttpUpstream:
        def __init__(self, base_url: str, *, response_timeout: float = 600.0) -> None:
            self.base_url = base_url
            self.timeout = aiohttp.ClientTimeout(sock_connect=10.0, total=None)
            self.response_timeout = response_timeout
            self._session: aiohttp.ClientSession | None = None

        async def open(
            self,
            method: str,
            target: bytes,
            headers: list[tuple[bytes, bytes]],
            body: AsyncIterable[bytes] | None,
        ) -> Response:
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=512),
                    auto_decompress=False,
                    skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                    timeout=self.timeout,
                )
            url = URL(self.base_url + target.decode("latin-1"), encoded=True)
            h = CIMultiDict((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers)
            try:
                with anyio.fail_after(self.response_timeout):
                    r = await self._session.request(
                        method, url, headers=h, data=body, allow_redirects=False
                    )
            except TimeoutError:
                raise UpstreamTimeout("timeout") from None
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"{self.base_url} unreachable: {exc}") from exc
            return Response(r.status, list(r.raw_headers), r)

        async def aclose(self) -> None:
            if self._session is not None:
                await self._session.close()

    return AiohttpUpstream
