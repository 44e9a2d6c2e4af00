"""Two nodes behind an existing gateway: the LiteLLM proxy routes by model across two brokers'
``apiPort`` (docs/scale-out.md). Each broker is real, on loopback, in front of its own emulated
services on its own simulated GPU; LiteLLM is the real ``litellm`` proxy server as a
subprocess on 127.0.0.1, and the client is the official ``openai`` one.

Node A serves ``llama3.2`` and ``phi3`` (one Ollama); node B serves ``llama3.2`` (its Ollama)
and a vLLM model. A request for a model one node serves reaches that node; requests for the
model both serve are spread over both (``simple-shuffle``). Where each went is read from each
broker's ``/metrics`` (``gpubroker_api_requests_total``), which counts what the broker admitted
whatever the gateway says; LiteLLM's own headers name the node it chose
(``x-litellm-model-api-base``) and pass ours on prefixed (``llm_provider-x-gpubroker-…``).

Skips without litellm (``pip install -e '.[scaleout]'``, as .ci/run does).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from gpubroker.runtime import Endpoints
from gpubroker.sim import GiB, OllamaEmulator, SimGPU, VLLMEmulator, running
from gpubroker.testing import broker_running, make_config
from processes import free_port, popen

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("litellm") is None,
        reason="the LiteLLM proxy is not installed (pip install -e '.[scaleout]')",
    ),
]

SHARED = "llama3.2"  # both nodes
ONLY_A = "phi3"  # node A's Ollama
ONLY_B = "Qwen/Qwen2.5-1.5B"  # node B's vLLM
MASTER_KEY = "sk-gateway-" + "0123456789abcdef" * 2  # LiteLLM refuses to start without one
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "litellm" / "config.yaml"
NODE_A, NODE_B = "gpu-a.nodes.example.internal", "gpu-b.nodes.example.internal"
NODE_KEY = "gw-" + "fedcba9876543210" * 2  # each broker's apiKeys: the gateway's key
GHOST = "mistral"  # no node serves it; a gateway deployment says node A does
WRONG_KEY = "phi3-badkey"  # node A with a key its broker does not know
SPREAD = 40  # requests for SHARED: all on one node by chance is 2 * 2**-40
PROMPT = [{"role": "user", "content": "hi"}]
STARTUP = 180.0  # s: LiteLLM imports a great deal; a loaded CI machine is slow at it


@asynccontextmanager
async def node(name: str, with_vllm: bool) -> AsyncIterator[Endpoints]:
    """One node: a broker with its own emulated services on its own simulated GPU."""
    gpu = SimGPU(24 * GiB)
    models = {f"{SHARED}:latest": 4 * GiB} | ({} if with_vllm else {f"{ONLY_A}:latest": 3 * GiB})
    emu = OllamaEmulator(gpu, models, token_interval=0.001, owner=f"ollama-{name}")
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(running(emu.app))
        backends: dict[str, Any] = {"ollama": {"upstream": url, "unloadStrategy": "ollama"}}
        if with_vllm:
            vllm = VLLMEmulator(gpu, ONLY_B, 4 * GiB, 2 * GiB, token_interval=0.001)
            url = await stack.enter_async_context(running(vllm.app))
            backends["vllm"] = {"upstream": url, "unloadStrategy": "vllm"}
        cfg = make_config(
            backends,
            apiPort=20100,
            holdTime="100ms",
            apiKeys=[{"name": "gateway", "key": NODE_KEY}],
        )
        yield await stack.enter_async_context(broker_running(cfg))
    assert gpu.oom_count == 0


def litellm_config(a: str, b: str) -> dict[str, Any]:
    """examples/litellm/config.yaml with its two nodes' addresses replaced by ``a`` and
    ``b``: every model on the nodes that serve it, as OpenAI-compatible deployments; one
    ``model_name`` twice is one model group, spread by the router."""
    config: dict[str, Any] = YAML(typ="safe").load(EXAMPLE.read_text())
    nodes = {NODE_A: a, NODE_B: b}
    for deployment in config["model_list"]:
        params = deployment["litellm_params"]
        base = httpx.URL(params["api_base"])
        params["api_base"] = nodes[base.host] + base.path
    return config


@asynccontextmanager
async def gateway(config: dict[str, Any], tmp_path: Path) -> AsyncIterator[str]:
    """The real LiteLLM proxy on a free loopback port, stopped (bounded) when the block ends."""
    path = tmp_path / "litellm.yaml"
    with path.open("w") as f:
        YAML(typ="safe").dump(config, f)
    port = free_port()
    env = {  # nothing of this machine's (no .env, keys, DATABASE_URL or proxies) leaks in
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "NO_PROXY": "127.0.0.1,localhost",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the bundled cost map: no download at start
        "LITELLM_MASTER_KEY": MASTER_KEY,  # the example reads both keys from the environment
        "GPUBROKER_GATEWAY_KEY": NODE_KEY,
    }
    log = (tmp_path / "litellm.log").open("wb")
    argv = [sys.executable, "-m", "litellm.proxy.proxy_cli", "--config", str(path)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    proc = popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            with anyio.move_on_after(STARTUP):
                while proc.poll() is None:
                    try:
                        if (await client.get(url + "/health/liveliness")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await anyio.sleep(0.25)
        if proc.poll() is not None or not await _alive(url):
            tail = (tmp_path / "litellm.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"the LiteLLM proxy did not start (exit {proc.poll()}):\n{tail}")
        yield url
    finally:
        proc.terminate()
        try:
            await anyio.to_thread.run_sync(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            await anyio.to_thread.run_sync(proc.wait)
        log.close()


async def _alive(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            return (await client.get(url + "/health/liveliness")).status_code == 200
    except httpx.TransportError:
        return False


async def served(ep: Endpoints) -> Counter[str]:
    """GPU requests this broker's api port admitted with the gateway's key, by model."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(ep.status_url + "/metrics")).text
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "gpubroker_api_requests_total" and s.labels["caller"] == "gateway":
                out[s.labels["model"]] += int(s.value)
    return out


async def ask(client: openai.AsyncOpenAI, model: str) -> str:
    reply = await client.chat.completions.create(model=model, messages=PROMPT, max_tokens=2)
    content = reply.choices[0].message.content
    assert content, reply
    return content


def misrouted(config: dict[str, Any], a: str) -> dict[str, Any]:
    """Two deployments a gateway gets wrong: a model node A does not serve, and node A with
    a key its broker does not know."""
    base = {"api_base": a + "/v1", "api_key": NODE_KEY}
    ghost = {"model_name": GHOST, "litellm_params": {**base, "model": f"openai/{GHOST}"}}
    params = {**base, "model": f"openai/{ONLY_A}", "api_key": "gw-" + "0" * 32}
    config["model_list"] += [ghost, {"model_name": WRONG_KEY, "litellm_params": params}]
    return config


async def test_the_gateway_sends_each_model_to_a_node_that_serves_it(tmp_path: Path) -> None:
    async with node("a", with_vllm=False) as a, node("b", with_vllm=True) as b:
        assert a.api_url is not None and b.api_url is not None
        config = misrouted(litellm_config(a.api_url, b.api_url), a.api_url)
        async with gateway(config, tmp_path) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=MASTER_KEY, max_retries=0)
            with anyio.fail_after(120):
                listed = {m.id async for m in client.models.list()}
                assert {SHARED, ONLY_A, ONLY_B} <= listed
                await ask(client, ONLY_A)
                raw = await client.chat.completions.with_raw_response.create(
                    model=ONLY_B, messages=PROMPT, max_tokens=2
                )
                only = (await served(a), await served(b))
                for _ in range(SPREAD):
                    await ask(client, SHARED)
                spread = (await served(a), await served(b))
                # a broker's refusals reach the client through the gateway as what they are
                with pytest.raises(openai.NotFoundError) as missing:
                    await ask(client, GHOST)
                with pytest.raises(openai.AuthenticationError):
                    await ask(client, WRONG_KEY)
            await client.close()
    assert f"the model '{GHOST}' is served by no backend" in str(missing.value)  # our words
    on_a, on_b = only
    # LiteLLM names the node it chose, and passes the broker's headers on, prefixed
    assert raw.headers["x-litellm-model-api-base"] == b.api_url + "/v1"
    assert raw.headers["llm_provider-x-gpubroker-backend"] == "vllm"
    # a model one node serves reached that node, and only it
    assert on_a[ONLY_A] == 1 and on_b[ONLY_A] == 0
    assert on_b[ONLY_B] == 1 and on_a[ONLY_B] == 0
    # the model both serve went to both, each answered exactly once
    shared_a = spread[0][SHARED]
    shared_b = spread[1][SHARED]
    assert shared_a + shared_b == SPREAD
    assert shared_a >= 1 and shared_b >= 1, (shared_a, shared_b)
