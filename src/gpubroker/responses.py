"""Errors the broker itself answers with, as raw ASGI sends.

Shape: ``{"error": code, "message": …, "backend": …, "retryable": bool}``. An upstream's own
4xx/5xx is never wrapped: it passes through untouched.

    400 bad_request            a target or framing the proxy will not pass on (proxy.py)
    405 method_not_allowed     CONNECT and TRACE (with Allow)
    408 request_timeout        the request body sent nothing for clientIdleTimeout
    431 headers_too_large      a request head over 64 KiB (serving.py)
    508 loop_detected          the request already passed 4 brokers (an upstream loop)
    502 upstream_unreachable   the service refused or dropped the connection
    502 bad_upstream_response  the service's response head was ambiguous or malformed (both
                               Content-Length and Transfer-Encoding, obs-fold lines): not passed on
    502 load_failed            the service could not be made ready after a swap
    503 queue_timeout          waited past queueTimeout for the GPU (with Retry-After)
    503 shutting_down          the broker is stopping
    504 upstream_timeout       no response headers within upstreamTimeout
    507 never_fits             the request can never fit on its GPU
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Send

RETRYABLE = frozenset({409, 502, 503, 504})  # the same request may succeed later


def retryable(status: int) -> bool:
    return status in RETRYABLE


def error_body(code: str, message: str, backend: str | None, retryable: bool) -> bytes:
    return json.dumps(
        {"error": code, "message": message, "backend": backend, "retryable": retryable}
    ).encode()


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    backend: str | None,
    retryable: bool,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    body = error_body(code, message, backend, retryable)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def error_response(
    status: int, code: str, message: str, backend: str | None = None
) -> JSONResponse:
    """The same error shape for the status and admin routes (Starlette)."""
    body = {"error": code, "message": message, "backend": backend, "retryable": retryable(status)}
    return JSONResponse(body, status_code=status)


async def json_object(request: Request) -> dict[str, Any] | Response:
    """An admin verb's body: {} when empty, else a JSON object, else a 400 to send back."""
    raw = await request.body()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return error_response(400, "bad_request", "the body must be JSON")
    if not isinstance(data, dict):
        return error_response(400, "bad_request", "the body must be a JSON object")
    return data
