"""The one rendering of a :class:`~gpubroker.errors.ClientError`: status, headers and JSON body.

The proxy and the listeners send it as raw ASGI messages (``send_error``); the status app gets
it from its exception handlers (``exception_handlers``), so an admin route just raises. The
codes, statuses and the retryable rule are the error classes' (see ``gpubroker.errors``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ExceptionHandler, Send

from gpubroker.errors import BadRequest, ClientError, Header, InternalError

INTERNAL = "the broker failed while answering this request; its log says why"


def render(error: ClientError, backend: str | None = None) -> tuple[int, list[Header], bytes]:
    """``error`` as (status, headers, body). ``backend`` names the backend when the error's
    raiser did not know it (the proxy's upstream client)."""
    body = json.dumps(
        {
            "error": error.code,
            "message": error.message,
            "backend": backend or error.backend,
            "retryable": error.retryable,
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *error.headers,
    ]
    return error.status, headers, body


async def send_error(
    send: Send, error: ClientError, *, backend: str | None = None, prefix: str = "http"
) -> None:
    """Answer with ``error`` over raw ASGI; ``prefix`` is ``websocket.http`` to answer a
    WebSocket handshake."""
    status, headers, body = render(error, backend)
    await send({"type": f"{prefix}.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": body, "more_body": False})


ErrorRenderer = Callable[[Send, ClientError, str | None], Awaitable[None]]
"""How one port answers a broker-made error: (send, error, backend). The proxy ports use
:func:`json_error`; the api port renders the same error in OpenAI's or Ollama's shape."""


async def json_error(send: Send, error: ClientError, backend: str | None) -> None:
    """The proxy ports' renderer: ``send_error``'s JSON body."""
    await send_error(send, error, backend=backend)


def error_response(error: ClientError) -> Response:
    """``error`` as a Starlette response, the same bytes ``send_error`` sends."""
    status, headers, body = render(error)
    return Response(body, status, {k.decode("latin-1"): v.decode("latin-1") for k, v in headers})


async def _client_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClientError)
    return error_response(exc)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises ``exc`` after this answer, so the server logs its traceback; the
    # client is told only that it happened.
    return error_response(InternalError(INTERNAL))


# For ``Starlette(exception_handlers=…)``: a ClientError is its JSON answer, anything else
# unexpected a 500 ``internal_error`` in the same shape.
exception_handlers: dict[Any, ExceptionHandler] = {
    ClientError: _client_error,
    Exception: _internal_error,
}


async def json_object(request: Request) -> dict[str, Any]:
    """An admin verb's body: {} when empty, else a JSON object; else raises ``BadRequest``."""
    raw = await request.body()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadRequest("the body must be JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data
