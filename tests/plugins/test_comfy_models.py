"""The model files a ComfyUI workflow names, and ComfyUIStrategy.demand over real bodies."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpubroker.config.model import BackendConfig
from gpubroker.plugins.strategies.base import Demand, StrategyContext
from gpubroker.plugins.strategies.builtin import ComfyUIStrategy as ReExported
from gpubroker.plugins.strategies.comfy_models import LOADER_INPUTS, workflow_models
from gpubroker.plugins.strategies.comfyui import THREAD_PARSE, WORKING_MEMORY, ComfyUIStrategy
from gpubroker.sim import ComfyUIEmulator, GiB, SimGPU, flux_workflow, running, simple_workflow
from gpubroker.sim.comfyui_models import NODE_FILES

pytestmark = pytest.mark.anyio

# SDXL base + refiner, as ComfyUI's SDXL example exports it in API format (trimmed).
SDXL_REFINER: dict[str, Any] = {
    "4": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"},
    },
    "5": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 1024, "height": 1024, "batch_size": 1},
    },
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a GPU", "clip": ["4", 1]}},
    "10": {
        "class_type": "KSamplerAdvanced",
        "inputs": {"model": ["4", 0], "positive": ["6", 0], "latent_image": ["5", 0], "steps": 25},
    },
    "11": {
        "class_type": "KSamplerAdvanced",
        "inputs": {"model": ["12", 0], "latent_image": ["10", 0], "steps": 25},
    },
    "12": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "sd_xl_refiner_1.0.safetensors"},
    },
    "17": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}},
    "19": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["17", 0]}},
}

# A LoRA chain: checkpoint -> LoraLoader -> LoraLoader -> LoraLoaderModelOnly (one repeated).
LORA_CHAIN: dict[str, Any] = {
    "1": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "SD1.5/dreamshaper.ckpt"},
    },
    "2": {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["1", 0],
            "clip": ["1", 1],
            "lora_name": "style.safetensors",
            "strength_model": 1.0,
            "strength_clip": 1.0,
        },
    },
    "3": {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["2", 0],
            "clip": ["2", 1],
            "lora_name": "detail.safetensors",
            "strength_model": 0.5,
            "strength_clip": 0.5,
        },
    },
    "4": {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["3", 0], "lora_name": "style.safetensors", "strength_model": 0.2},
    },
    "5": {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-mse-840000.safetensors"}},
}


def test_sdxl_base_and_refiner_name_both_checkpoints() -> None:
    assert workflow_models(SDXL_REFINER) == (
        "sd_xl_base_1.0.safetensors",
        "sd_xl_refiner_1.0.safetensors",
    )
    assert workflow_models(simple_workflow()) == ("sdxl.safetensors",)


def test_flux_names_its_unet_both_text_encoders_and_its_vae() -> None:
    assert workflow_models(flux_workflow()) == (
        "ae.safetensors",
        "t5xxl_fp16.safetensors",
        "clip_l.safetensors",
        "flux1-dev.safetensors",
    )


def test_a_lora_chain_names_each_file_once_in_order() -> None:
    assert workflow_models(LORA_CHAIN) == (
        "SD1.5/dreamshaper.ckpt",
        "style.safetensors",
        "detail.safetensors",
        "vae-ft-mse-840000.safetensors",
    )


def test_links_and_non_strings_name_nothing() -> None:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ["9", 0]}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": 7}},
        "3": {"class_type": "UNETLoader", "inputs": {"unet_name": None}},
        "9": {"class_type": "PrimitiveString", "inputs": {"value": "x.safetensors"}},
    }
    assert workflow_models(prompt) == ()


def test_core_classes_by_their_inputs_custom_nodes_by_the_core_input_names_only() -> None:
    prompt = {
        "1": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x.pth"}},
        "2": {"class_type": "ModelPatchLoader", "inputs": {"name": "patch.safetensors"}},
        "3": {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": "flux-Q4.gguf"}},
        "4": {"class_type": "DualCLIPLoaderGGUF", "inputs": {"clip_name1": "t5-Q8.gguf"}},
        "5": {"class_type": "SomeLLMNode", "inputs": {"model_name": "llama3", "name": "n"}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "7": {"class_type": "TrainLoraNode", "inputs": {"existing_lora": "[None]"}},
        "8": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "g", "clip_name3": "t5"}},
        "9": {"class_type": "CheckpointLoader", "inputs": {"config_name": "v1.yaml"}},
    }
    assert workflow_models(prompt) == (
        "4x.pth",
        "patch.safetensors",
        "flux-Q4.gguf",
        "t5-Q8.gguf",
        "g",
        "t5",
    )


JUNK: list[Any] = [None, 0, 1.5, "x", [], [1, 2], {}, {"1": 5}, {"1": {"inputs": []}}]
JUNK += [{"1": {"inputs": None}}, {"1": {"class_type": ["x"], "inputs": {"ckpt_name": "a"}}}]
JUNK += [{1: {"inputs": {"vae_name": "v"}}}]


@pytest.mark.parametrize("junk", JUNK)
def test_junk_names_nothing_or_only_what_it_literally_names(junk: Any) -> None:
    assert workflow_models(junk) in ((), ("a",), ("v",))


def test_the_strategy_and_the_emulator_read_the_same_loader_inputs() -> None:
    # Two tables on purpose (the broker's reading, the emulated ComfyUI): they must agree.
    assert {c: tuple(i for i, _ in f) for c, f in NODE_FILES.items()} == dict(LOADER_INPUTS)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["class_type", "inputs", "ckpt_name", "lora_name", "1", "x"])
            | st.text(),
            inner,
            max_size=4,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_it_never_raises_and_only_returns_strings_the_value_holds(value: Any) -> None:
    found = workflow_models(value)
    assert isinstance(found, tuple) and len(set(found)) == len(found)
    text = json.dumps(value)
    assert all(isinstance(f, str) and json.dumps(f) in text for f in found)


# -- ComfyUIStrategy.demand -------------------------------------------------------------------


def comfy_strategy() -> tuple[ComfyUIStrategy, httpx.AsyncClient]:
    backend = BackendConfig(
        name="c", proxy_port=1, upstream="http://127.0.0.1:9", unload_strategy="comfyui"
    )
    client = httpx.AsyncClient(base_url=backend.upstream, trust_env=False)
    return ComfyUIStrategy(
        StrategyContext(backend=backend, client=client, unload_timeout=5.0)
    ), client


def body(prompt: Any, **extra: Any) -> bytes:
    return json.dumps({"prompt": prompt, "client_id": "x", **extra}).encode()


async def test_a_prompt_asks_for_the_files_its_workflow_names() -> None:
    s, client = comfy_strategy()
    async with client:
        assert ReExported is ComfyUIStrategy
        flux = await s.demand("POST", "/prompt", body(flux_workflow(loras=("detail.safetensors",))))
        assert flux == Demand(
            parts=(
                "ae.safetensors",
                "t5xxl_fp16.safetensors",
                "clip_l.safetensors",
                "flux1-dev.safetensors",
                "detail.safetensors",
            ),
            need=WORKING_MEMORY,  # what ComfyUI keeps free for sampling beside its files
        )
        assert flux.model is None
        # ComfyUI's frontend posts to /api/prompt (server.py: every route also under /api)
        sdxl = await s.demand("POST", "/api/prompt", body(SDXL_REFINER))
        assert sdxl is not None and sdxl.parts == workflow_models(SDXL_REFINER)
        lora = await s.demand("POST", "/prompt?x=1", body(LORA_CHAIN))
        assert lora is not None and lora.parts[1:3] == ("style.safetensors", "detail.safetensors")
        free = {"1": {"class_type": "EmptyImage", "inputs": {}}}
        assert await s.demand("POST", "/prompt", body(free)) == Demand()


async def test_a_large_body_from_the_web_ui_is_read_too() -> None:
    s, client = comfy_strategy()
    pnginfo = {"extra_pnginfo": {"workflow": {"nodes": ["n" * 100] * (THREAD_PARSE // 50)}}}
    raw = body(flux_workflow(), extra_data=pnginfo)
    assert len(raw) > THREAD_PARSE
    async with client:
        demand = await s.demand("POST", "/api/prompt", raw)
    assert demand is not None and "flux1-dev.safetensors" in demand.parts


@pytest.mark.parametrize(
    ("method", "path", "raw"),
    [
        ("GET", "/prompt", b""),
        ("POST", "/free", body(flux_workflow())),
        ("POST", "/queue", body(flux_workflow())),
        ("POST", "/prompt", b""),
        ("POST", "/prompt", b"not json"),
        ("POST", "/prompt", b"\xff\xfe\x00garbage"),
        ("POST", "/prompt", b"[1, 2]"),
        ("POST", "/prompt", b'{"client_id": "x"}'),
        ("POST", "/prompt", b'{"prompt": [1]}'),
        ("POST", "/prompt", b'{"prompt": "x"}'),
        ("POST", "/prompt", b"[" * 100_000 + b"]" * 100_000),
        ("POST", "/prompt", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ],
)
async def test_other_requests_and_bad_bodies_ask_nothing(
    method: str, path: str, raw: bytes
) -> None:
    s, client = comfy_strategy()
    async with client:
        assert await s.demand(method, path, raw) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps({"prompt": v}).encode()))
def test_demand_never_raises(raw: bytes) -> None:
    async def check() -> None:
        s, client = comfy_strategy()
        async with client:
            demand = await s.demand("POST", "/prompt", raw)
        assert demand is None or isinstance(demand.parts, tuple)

    anyio.run(check)


async def test_what_demand_asks_for_is_what_comfyui_then_holds() -> None:
    # Over a real socket: the files the strategy reads from the body are the ones the
    # emulated ComfyUI puts on the GPU (the LoRA, merged into the UNET, holds none of its own).
    gpu = SimGPU(24 * GiB)
    emu = ComfyUIEmulator(gpu, 1 * GiB, job_seconds=0.01)
    prompt = flux_workflow(loras=("detail.safetensors",))
    async with running(emu.app) as url, httpx.AsyncClient(base_url=url, trust_env=False) as c:
        s = ComfyUIStrategy(
            StrategyContext(
                backend=BackendConfig(
                    name="c", proxy_port=1, upstream=url, unload_strategy="comfyui"
                ),
                client=c,
                unload_timeout=5.0,
            )
        )
        raw = body(prompt)
        demand = await s.demand("POST", "/prompt", raw)
        reply = await c.post("/prompt", content=raw, headers={"content-type": "application/json"})
        assert reply.status_code == 200
        with anyio.fail_after(5):
            while await s.busy():
                await anyio.sleep(0.01)
        assert demand is not None
        assert set(demand.parts) - {"detail.safetensors"} == set(emu.cached)
        await s.unload()  # /free, confirmed by /system_stats
        assert emu.cached == ()
