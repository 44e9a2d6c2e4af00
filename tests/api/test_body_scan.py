"""The api port's body reading: a multipart ``model`` field after a large file is found in
one pass over the upload (the event loop is not held), and only a field named exactly
``model`` names the model."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gpubroker.api import body

pytestmark = pytest.mark.anyio

BOUNDARY = b"XyZ"
CHUNK = 64 * 1024


def _part(name: bytes, value: bytes, extra: bytes = b"") -> bytes:
    return (
        b"--" + BOUNDARY + b"\r\n"
        b'Content-Disposition: form-data; name="'
        + name
        + b'"'
        + extra
        + b"\r\n\r\n"
        + value
        + b"\r\n"
    )


def _receive(data: bytes) -> Any:
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    return receive


class _Counting:
    """The disposition pattern, counting the bytes each search has to look at."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.looked_at = 0

    def search(self, data: bytes, pos: int = 0) -> re.Match[bytes] | None:
        self.looked_at += len(data) - pos
        return self.pattern.search(data, pos)


async def test_a_model_field_after_a_large_file_is_found_in_one_pass(monkeypatch) -> None:
    audio = bytes(range(256)) * (16 * 1024)  # 4 MiB
    form = (
        _part(b"model_id", b"not-this")
        + _part(b"models", b"nor-this")
        + _part(b"file", audio, b'; filename="talk.wav"')
        + _part(b"model", b"whisper-1")
        + _part(b"language", b"en")
        + b"--"
        + BOUNDARY
        + b"--\r\n"
    )
    counting = _Counting(body._DISPOSITION)
    monkeypatch.setattr(body, "_DISPOSITION", counting)
    read = await body.read_multipart(_receive(form), 64 * 1024 * 1024, BOUNDARY)
    assert read.model == "whisper-1"  # not model_id's nor models' value
    assert read.rewritten("large-v3").count(b"large-v3") == 1
    chunks = len(form) // CHUNK + 1
    assert counting.looked_at < len(form) + chunks * 2 * body._OVERLAP  # once, not per chunk


async def test_a_model_field_split_across_chunks_is_found() -> None:
    pad = b"x" * (CHUNK - 20)
    form = _part(b"file", pad) + _part(b"model", b"whisper-1") + b"--" + BOUNDARY + b"--\r\n"
    read = await body.read_multipart(_receive(form), 1024 * 1024, BOUNDARY)
    assert read.model == "whisper-1"
    assert read.head == form[: len(read.head)]


async def test_a_form_with_only_model_id_names_no_model() -> None:
    form = _part(b"model_id", b"whisper-1") + b"--" + BOUNDARY + b"--\r\n"
    with pytest.raises(body.BadRequest):
        await body.read_multipart(_receive(form), 1024 * 1024, BOUNDARY)
