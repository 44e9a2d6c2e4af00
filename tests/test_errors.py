"""The error tree and its one rendering: every ClientError answers as ``gpubroker.errors``'
table says, over raw ASGI and from the status app alike, and an unexpected failure in an
admin route is a JSON 500 that tells the client nothing of its traceback."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from starlette.types import Message

from gpubroker import errors
from gpubroker.errors import (
    ClientError,
    GPUBrokerError,
    NotFound,
    Refused,
    SwapInProgress,
)
from gpubroker.events import EventBus
from gpubroker.observe.status import StatusApp
from gpubroker.responses import error_response, render, send_error
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.domains import build_scheduler
from gpubroker.scheduling.effects import Refuse
from gpubroker.testing import make_config

ABSTRACT = {NotFound, Refused}  # bases named for what their subclasses share; never raised


def _tree(cls: type[ClientError]) -> list[type[ClientError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _tree(sub))]


CLASSES = [c for c in _tree(ClientError) if c not in ABSTRACT and c is not ClientError]


def _table() -> dict[str, tuple[int, bool]]:
    """code -> (status, retryable) as the module docstring's table documents them."""
    rows = re.findall(r"^    (\d{3}) (\w+) +(.*)$", errors.__doc__ or "", re.MULTILINE)
    return {code: (int(status), "retryable" in text) for status, code, text in rows}


def _make(cls: type[ClientError]) -> ClientError:
    if issubclass(cls, SwapInProgress):
        return cls("b", backend="a")
    if issubclass(cls, Refused):
        return Refused.of(Refuse(1, "a", cls.status, cls.code, "no", retry_after=2.4))
    return cls("no", backend="a", headers=[(b"x-extra", b"1")])


def test_the_table_lists_every_client_error_and_nothing_else() -> None:
    assert set(_table()) == {c.code for c in CLASSES}


def test_everything_raised_on_purpose_is_in_the_one_tree() -> None:
    assert all(issubclass(c, GPUBrokerError) for c in CLASSES)
    for name in ("WorkerError", "TelemetryError", "StrategyFailed", "AdminFailed", "ClientGone"):
        assert issubclass(getattr(errors, name), GPUBrokerError)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_client_error_renders_its_documented_answer(cls: type[ClientError]) -> None:
    error = _make(cls)
    status, retryable = _table()[cls.code]
    got_status, headers, body = render(error)
    assert (got_status, error.retryable) == (status, retryable)
    assert json.loads(body) == {
        "error": cls.code,
        "message": error.message,
        "backend": "a",
        "retryable": retryable,
    }
    assert headers[:2] == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    assert headers[2:] == error.headers
    # the status app's answer is the same status, headers and bytes
    response = error_response(error)
    assert response.status_code == status and response.body == body
    assert response.raw_headers == headers


@pytest.mark.anyio
async def test_the_raw_asgi_answer_is_the_rendering() -> None:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    error = errors.UpstreamTimeout("no head in 5s")
    await send_error(send, error, backend="svc")
    status, headers, body = render(error, "svc")
    assert sent == [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]
    assert json.loads(body)["backend"] == "svc" and status == 504


@pytest.mark.parametrize(
    ("code", "status", "retry_after", "header"),
    [
        ("queue_timeout", 503, 30.0, [(b"retry-after", b"30")]),
        ("shutting_down", 503, 5.0, [(b"retry-after", b"5")]),
        ("load_failed", 502, None, []),
        ("never_fits", 507, None, []),
    ],
)
def test_a_scheduler_refusal_becomes_its_class(
    code: str, status: int, retry_after: float | None, header: list[Any]
) -> None:
    refusal = Refuse(7, "a", status, code, "why", retry_after=retry_after)
    error = Refused.of(refusal)
    assert (error.status, error.code, error.backend, error.message) == (status, code, "a", "why")
    assert error.headers == header and error.refusal is refusal


def _status_app() -> tuple[StatusApp, Broker]:
    config, bus = make_config({}, telemetry="none"), EventBus()
    broker = Broker(config, {}, build_scheduler(config, {}, None), bus)
    return StatusApp(broker, bus), broker


async def _post(app: StatusApp, path: str, body: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8600") as client:
        return await client.post(path, json=body)


@pytest.mark.anyio
async def test_an_unexpected_failure_in_an_admin_route_is_a_json_500(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, broker = _status_app()

    async def evict(name: str | None, *, force: bool = False) -> None:
        raise RuntimeError("secret detail of a bug")

    monkeypatch.setattr(broker, "evict", evict)
    r = await _post(app, "/api/unload", {})
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "error": "internal_error",
        "message": "the broker failed while answering this request; its log says why",
        "backend": None,
        "retryable": False,
    }
    assert "secret" not in r.text and "Traceback" not in r.text


@pytest.mark.anyio
async def test_a_raised_client_error_is_answered_by_the_status_apps_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, broker = _status_app()

    async def evict(name: str | None, *, force: bool = False) -> None:
        raise SwapInProgress("b", backend=name)

    monkeypatch.setattr(broker, "evict", evict)
    r = await _post(app, "/api/unload", {})
    status, _, body = render(SwapInProgress("b"))
    assert (r.status_code, r.content) == (status, body) == (409, r.content)
    assert r.json()["retryable"] is True
    # the workers routes, mounted on the same app, answer through the same handler
    w = await _post(app, "/api/workers/start", {"name": "a"})
    assert w.status_code == 404 and w.json()["error"] == "unknown_worker"


def test_a_refusal_code_the_tree_does_not_name_keeps_its_own_status_and_code() -> None:
    error = Refused.of(Refuse(9, "a", 409, "busy_elsewhere", "why"))
    assert isinstance(error, Refused)
    assert (error.status, error.code, error.retryable, error.message) == (
        409,
        "busy_elsewhere",
        False,
        "why",
    )
    assert Refused.of(Refuse(9, "a", 503, "rate_limited", "why")).retryable
