"""Audio routes carry ``model`` as a multipart form field: the api port finds it without
reading the file, renames an alias there, and the upstream gets every byte of the upload."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest
from starlette.types import Receive, Scope, Send

from gpubroker.sim import running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio


class SpeechService:
    """An OpenAI-compatible transcription server (whisper.cpp's and faster-whisper's servers
    answer this route; neither runs here): it answers with what it was sent."""

    def __init__(self) -> None:
        self.received: list[tuple[str, bytes]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.received.append((scope["path"], body))
        model = re.search(rb'name="model"\r\n\r\n([^\r]*)\r\n', body)
        answer: dict[str, Any] = {"text": (model.group(1) if model else b"").decode()}
        payload = json.dumps(answer).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def test_a_transcription_is_routed_by_its_form_field_and_its_alias_renamed() -> None:
    service = SpeechService()
    audio = bytes(range(256)) * 4096  # 1 MiB of "audio"
    async with running(service) as url:
        backend = {
            "upstream": url,
            "unloadStrategy": "generic",
            "gpuPaths": ["POST /v1/audio/*"],
            "models": [{"name": "whisper-1", "upstreamModel": "large-v3"}],
        }
        cfg = make_config({"whisper": backend}, apiPort=20100)
        async with broker_running(cfg) as ep:
            client = openai.AsyncOpenAI(base_url=f"{ep.api_url}/v1", api_key="x", max_retries=0)
            raw = await client.audio.transcriptions.with_raw_response.create(
                model="whisper-1", file=("talk.wav", audio, "audio/wav")
            )
            await client.close()
            async with httpx.AsyncClient(timeout=10) as http:
                status = (await http.get(ep.status_url + "/")).json()
    assert raw.headers["x-gpubroker-backend"] == "whisper"
    assert raw.parse().text == "large-v3"  # the alias became the upstream's name in the form
    uploads = [body for path, body in service.received if path == "/v1/audio/transcriptions"]
    assert len(uploads) == 1 and audio in uploads[0]  # the upload, every byte
    assert status["gpuRequests"]["whisper"] == 1
