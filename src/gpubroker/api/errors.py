"""Errors on the api port in each protocol's own shape, keeping status and headers.

OpenAI clients read ``{"error": {"message", "type", "param", "code"}}`` (the official client
raises ``NotFoundError`` etc. from the status and shows ``message``); Ollama clients read
``{"error": "..."}``. A broker-made error (queue timeout, never fits, upstream down) keeps its
status and ``Retry-After``, so a client's retry logic works as on the proxy ports. These are
the ``errors=`` renderers handed to :meth:`ProxyApp.http`.
"""

from __future__ import annotations

import json

from starlette.types import Send

from gpubroker.errors import ClientError

# The OpenAI error ``type`` for a status, as OpenAI's own API answers them.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
}
_MODEL_CODES = frozenset({"model_not_found", "model_missing", "model_forbidden"})


def openai_body(error: ClientError, backend: str | None = None) -> bytes:
    kind = _OPENAI_TYPES.get(error.status, "server_error" if error.status >= 500 else "api_error")
    message = error.message
    if backend and error.status >= 500 and backend not in message:
        message = f"{backend}: {message}"
    body = {
        "message": message,
        "type": kind,
        "param": "model" if error.code in _MODEL_CODES else None,
        "code": error.code,
    }
    return json.dumps({"error": body}).encode()


def ollama_body(error: ClientError, backend: str | None = None) -> bytes:
    message = error.message
    if backend and error.status >= 500 and backend not in message:
        message = f"{backend}: {message}"
    return json.dumps({"error": message}).encode()


async def _send(send: Send, error: ClientError, body: bytes) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *error.headers,
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def openai_error(send: Send, error: ClientError, backend: str | None) -> None:
    """An ``ErrorRenderer``: ``error`` as OpenAI's API answers one."""
    await _send(send, error, openai_body(error, backend))


async def ollama_error(send: Send, error: ClientError, backend: str | None) -> None:
    """An ``ErrorRenderer``: ``error`` as Ollama's API answers one."""
    await _send(send, error, ollama_body(error, backend))
