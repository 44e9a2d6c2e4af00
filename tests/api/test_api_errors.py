"""Broker-made errors on the api port keep their status and Retry-After, in each shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpubroker.api.errors import ollama_error, openai_error
from gpubroker.errors import ClientError, ModelNotFound, Refused, UpstreamTimeout
from gpubroker.scheduling.effects import Refuse

pytestmark = pytest.mark.anyio


async def answer(renderer: Any, error: ClientError, backend: str | None) -> tuple[int, dict, Any]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await renderer(send, error, backend)
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    assert int(headers["content-length"]) == len(sent[1]["body"])
    return sent[0]["status"], headers, json.loads(sent[1]["body"])


async def test_a_queue_timeout_is_a_503_with_retry_after_in_openai_and_ollama_shape() -> None:
    error = Refused.of(Refuse(1, "vllm", 503, "queue_timeout", "waited 120s", retry_after=5))
    status, headers, body = await answer(openai_error, error, "vllm")
    assert (status, headers["retry-after"]) == (503, "5")
    assert body == {
        "error": {
            "message": "vllm: waited 120s",
            "type": "server_error",
            "param": None,
            "code": "queue_timeout",
        }
    }
    status, headers, body = await answer(ollama_error, error, "vllm")
    assert (status, headers["retry-after"], body) == (503, "5", {"error": "vllm: waited 120s"})


async def test_never_fits_upstream_timeout_and_model_not_found_keep_their_status() -> None:
    fits = Refused.of(Refuse(1, "big", 507, "never_fits", "needs 30 GiB of 24"))
    assert (await answer(openai_error, fits, "big"))[0] == 507
    status, _, body = await answer(openai_error, UpstreamTimeout("no head in 600s"), "ollama")
    assert status == 504 and body["error"]["code"] == "upstream_timeout"
    status, _, body = await answer(openai_error, ModelNotFound("no model 'x'"), None)
    assert status == 404 and body["error"]["param"] == "model"
    assert body["error"]["message"] == "no model 'x'"
