"""ComfyUI's model memory, emulated: which files a workflow loads, and how long they stay.

Pinned to Comfy-Org/ComfyUI a125cd84b054 (2025-10-12; file: function), because the broker
sizes a ComfyUI job by the files its workflow names and must know what ComfyUI keeps:

- nodes.py and comfy_extras/ loader nodes: :data:`NODE_FILES`, each file input with what its
  weights do on the GPU (kept there, merged into another model, or there for one node only).
- comfy_execution/caching.py: the node output cache is what keeps a loaded model alive. The
  default (``HierarchicalCache``) keeps, when a prompt starts, only the outputs of nodes whose
  input signature the new prompt has too (``BasicCache.clean_unused``); with ``--cache-lru N``
  (``LRUCache``) the outputs of older prompts stay until more than N are cached, the oldest
  generations going first. A model no output holds is freed (its ModelPatcher is collected;
  comfy/model_management.py ``cleanup_models``): :class:`NodeCache`.
- comfy/model_management.py ``current_loaded_models`` / ``load_models_gpu`` /
  ``free_memory``: :class:`ModelCache`. Before a model goes to the GPU, ComfyUI unloads its own
  models until the *device's* free memory (``get_free_memory``: what CUDA reports free, so
  memory other processes hold counts) exceeds 1.1 x the weights plus
  ``minimum_inference_memory()`` (0.8 GiB + ``EXTRA_RESERVED_VRAM``, 400 MiB on Linux,
  ``--reserve-vram`` GiB when given). It picks them in ``free_memory``'s order: sorted by
  (offloaded bytes desc, refcount, size, position in the most-recently-loaded-first list), i.e.
  here the smallest first, then the most recently loaded. ``unload_all_models`` (``/free``,
  an OOM) unloads everything.

Not reproduced: partial loads and unloads (the default NORMAL_VRAM state streams what does not
fit, "lowvram"; here a model is loaded whole or the load OOMs, as with ``--highvram`` /
``--gpu-only``), torch's caching allocator (freed weights stay reserved until
``soft_empty_cache``), loads deferred to the node that uses a model (here the loader loads it)
and the refcount part of the order beyond "the running prompt's own models last".
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any, Literal

from gpubroker.sim.gpu import GiB, MiB, SimGPU

Kind = Literal["model", "patch", "transient"]
"""``model``: weights that go to the GPU and stay there (a ModelPatcher in
``current_loaded_models``). ``patch``: a LoRA and the like, merged into the weights of the
model it patches (comfy/sd.py ``load_lora_for_models``, model_patcher.py
``patch_weight_to_device``; the backups go to the offload device), so no VRAM of its own.
``transient``: an upscale model, moved to the GPU for its node and back to the CPU after
(comfy_extras/nodes_upscale_model.py ``ImageUpscaleWithModel``)."""

NODE_FILES: Mapping[str, tuple[tuple[str, Kind], ...]] = {
    # nodes.py
    "CheckpointLoader": (("ckpt_name", "model"),),
    "CheckpointLoaderSimple": (("ckpt_name", "model"),),
    "unCLIPCheckpointLoader": (("ckpt_name", "model"),),
    "DiffusersLoader": (("model_path", "model"),),
    "LoraLoader": (("lora_name", "patch"),),
    "LoraLoaderModelOnly": (("lora_name", "patch"),),
    "VAELoader": (("vae_name", "model"),),
    "ControlNetLoader": (("control_net_name", "model"),),
    "DiffControlNetLoader": (("control_net_name", "model"),),
    "UNETLoader": (("unet_name", "model"),),
    "CLIPLoader": (("clip_name", "model"),),
    "DualCLIPLoader": (("clip_name1", "model"), ("clip_name2", "model")),
    "CLIPVisionLoader": (("clip_name", "model"),),
    "StyleModelLoader": (("style_model_name", "model"),),
    "GLIGENLoader": (("gligen_name", "model"),),
    # comfy_extras/
    "TripleCLIPLoader": tuple((f"clip_name{i}", "model") for i in (1, 2, 3)),
    "QuadrupleCLIPLoader": tuple((f"clip_name{i}", "model") for i in (1, 2, 3, 4)),
    "CreateHookLora": (("lora_name", "patch"),),
    "CreateHookLoraModelOnly": (("lora_name", "patch"),),
    "CreateHookModelAsLora": (("ckpt_name", "patch"),),
    "CreateHookModelAsLoraModelOnly": (("ckpt_name", "patch"),),
    "HypernetworkLoader": (("hypernetwork_name", "model"),),  # moves with the model it patches
    "ModelPatchLoader": (("name", "model"),),
    "PhotoMakerLoader": (("photomaker_model_name", "model"),),
    "TrainLoraNode": (("existing_lora", "patch"),),
    "UpscaleModelLoader": (("model_name", "transient"),),
    "ImageOnlyCheckpointLoader": (("ckpt_name", "model"),),
    "AudioEncoderLoader": (("audio_encoder_name", "model"),),
}
"""The emulated ComfyUI's loader nodes: class -> (file input, kind) in declared order."""

_NO_FILE = frozenset({"pixel_space", "[None]"})
"""VAELoader's ``pixel_space`` loads nothing; TrainLoraNode's ``[None]`` starts a new LoRA."""

EXTRA_RESERVED_VRAM = 400 * MiB
"""comfy/model_management.py: reserved beyond the weights on Linux (600 MiB on Windows, 700
on Windows cards of 16 GiB and more; ``--reserve-vram`` replaces it)."""


def minimum_inference_memory(reserved: int = EXTRA_RESERVED_VRAM) -> int:
    """comfy/model_management.py ``minimum_inference_memory``: 0.8 GiB + the reserve."""
    return int(0.8 * GiB) + reserved


def node_files(node: Mapping[str, Any]) -> list[tuple[str, Kind]]:
    """The files a node of a (validated) prompt loads, with their kind; [] for other nodes."""
    inputs = node.get("inputs") or {}
    out: list[tuple[str, Kind]] = []
    for name, kind in NODE_FILES.get(str(node.get("class_type")), ()):
        value = inputs.get(name)
        if isinstance(value, str) and value and value not in _NO_FILE:
            out.append((value, kind))
    return out


def signatures(prompt: Mapping[str, Any]) -> dict[str, str]:
    """Each node's cache key, after comfy_execution/caching.py ``CacheKeySetInputSignature``:
    its class and inputs, a link standing for the signature of the node it comes from (so two
    prompts share a key when the node and everything upstream of it are the same)."""
    keys: dict[str, str] = {}

    def key(node_id: str, stack: frozenset[str]) -> Any:
        if node_id in keys:
            return keys[node_id]
        node = prompt.get(node_id)
        if not isinstance(node, Mapping) or node_id in stack:
            return ["missing", node_id]
        inputs = node.get("inputs") or {}
        parts = []
        for name in sorted(inputs):
            value = inputs[name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                value = ["link", key(value[0], stack | {node_id}), value[1]]
            parts.append([name, value])
        keys[node_id] = json.dumps([node.get("class_type"), parts], default=str, sort_keys=True)
        return keys[node_id]

    for node_id in prompt:
        key(node_id, frozenset())
    return keys


class NodeCache:
    """The node output cache, as far as it holds models: cache key -> files its outputs hold.

    ``lru`` 0 is ComfyUI's default (``HierarchicalCache``), N > 0 is ``--cache-lru N``.
    """

    def __init__(self, lru: int = 0) -> None:
        self.lru = lru
        self._entries: dict[str, tuple[str, ...]] = {}
        self._used: dict[str, int] = {}  # LRUCache.used_generation
        self._generation = 0
        self._min_generation = 0

    def set_prompt(self, keys: Collection[str]) -> None:
        """execution.py ``execute_async``: ``set_prompt`` then ``clean_unused`` for a new prompt."""
        if not self.lru:  # BasicCache._clean_cache: keep what the new prompt uses
            self._entries = {k: v for k, v in self._entries.items() if k in keys}
            return
        self._generation += 1  # LRUCache.set_prompt / clean_unused
        for k in keys:
            self._used[k] = self._generation
        while len(self._entries) > self.lru and self._min_generation < self._generation:
            self._min_generation += 1
            for k in [k for k in self._entries if self._used[k] < self._min_generation]:
                del self._entries[k], self._used[k]

    def put(self, key: str, files: tuple[str, ...]) -> None:
        """A node ran: its outputs (and the models in them) are cached under its key."""
        self._entries[key] = files
        if self.lru:
            self._used[key] = self._generation

    def files(self) -> set[str]:
        """The files some cached output still holds."""
        return {f for files in self._entries.values() for f in files}

    def clear(self) -> None:
        """``PromptExecutor.reset`` (the ``free_memory`` flag of /free): a new, empty cache."""
        self._entries.clear()
        self._used.clear()


class ModelCache:
    """``current_loaded_models`` on a :class:`SimGPU`: files on the GPU, last loaded first.

    ``gpu`` None: the device is the CPU (``--cpu``, Apple MPS), where ComfyUI still tracks its
    models but nothing lands on the card.
    """

    def __init__(
        self,
        gpu: SimGPU | None,
        owner: str,
        sizes: Mapping[str, int],
        default_size: int,
        *,
        reserved: int = EXTRA_RESERVED_VRAM,
    ) -> None:
        self.gpu = gpu
        self.owner = owner
        self.sizes = dict(sizes)
        self.default_size = default_size
        self.reserved = reserved
        self.loads = 0
        """How many times a file was put on the GPU."""
        self._loaded: list[str] = []  # most recently loaded first

    @property
    def cached(self) -> tuple[str, ...]:
        """The files whose weights are on the device, most recently loaded first."""
        return tuple(self._loaded)

    def size_of(self, name: str) -> int:
        return self.sizes.get(name, self.default_size)

    def __contains__(self, name: object) -> bool:
        return name in self._loaded

    def use(self, name: str) -> None:
        """``load_models_gpu`` on a model already there: it moves to the front of the list."""
        self._loaded.remove(name)
        self._loaded.insert(0, name)

    def load(self, name: str, busy: Collection[str] = ()) -> None:
        """``load_models_gpu`` for a model not on the GPU: make room, then load it whole.

        ``busy``: the running prompt's models, unloaded only after the others (they hold more
        references, the second key of ``free_memory``'s order). Raises
        :class:`~gpubroker.sim.gpu.OutOfMemory` when it does not fit even then.
        """
        size = self.size_of(name)
        if self.gpu is not None:
            needed = int(size * 1.1) + minimum_inference_memory(self.reserved)
            self.make_room(needed, busy=busy)
            self.gpu.allocate(self.owner, size, tag=_tag(name))
        self._loaded.insert(0, name)
        self.loads += 1

    def run_transient(self, name: str) -> None:
        """An upscale model: ``free_memory(its size)``, onto the GPU for its node, then off."""
        size = self.size_of(name)
        self.loads += 1
        if self.gpu is None:
            return
        self.make_room(size)
        self.gpu.allocate(self.owner, size, tag="transient")
        self.gpu.free(self.owner, tag="transient")

    def make_room(
        self, nbytes: int, keep: Collection[str] = (), busy: Collection[str] = ()
    ) -> list[str]:
        """``free_memory(nbytes, device, keep_loaded)``: unload models, in its order, until the
        device has more than ``nbytes`` free or none is left to unload; the unloaded ones.
        ``keep`` are never unloaded, ``busy`` ones only after all others."""
        if self.gpu is None:
            return []
        position = {name: i for i, name in enumerate(self._loaded)}
        order = sorted(
            (n for n in self._loaded if n not in keep),
            key=lambda n: (n in busy, self.size_of(n), position[n]),
        )
        unloaded: list[str] = []
        for name in order:
            if self.gpu.free_bytes > nbytes:
                break
            self.unload(name)
            unloaded.append(name)
        return unloaded

    def unload(self, name: str) -> None:
        """One model off the device (``LoadedModel.model_unload``; ``cleanup_models``)."""
        if name in self._loaded:
            self._loaded.remove(name)
            if self.gpu is not None:
                self.gpu.free(self.owner, tag=_tag(name))

    def keep_only(self, held: Collection[str]) -> None:
        """Free the models no cached output holds any more (their patchers are collected)."""
        for name in [n for n in self._loaded if n not in held]:
            self.unload(name)

    def unload_all(self) -> None:
        """``unload_all_models``: ``free_memory(1e30)``, every model off the device."""
        for name in list(self._loaded):
            self.unload(name)


def _tag(name: str) -> str:
    return f"file:{name}"


def flux_workflow(
    unet: str = "flux1-dev.safetensors",
    clips: tuple[str, str] = ("t5xxl_fp16.safetensors", "clip_l.safetensors"),
    vae: str = "ae.safetensors",
    loras: tuple[str, ...] = (),
    steps: int = 4,
) -> dict[str, Any]:
    """ComfyUI's Flux text-to-image example in API format: UNETLoader, DualCLIPLoader (type
    flux) and VAELoader, each file its own model, and ``loras`` chained on the UNET
    (LoraLoaderModelOnly), as a user adds them."""
    prompt: dict[str, Any] = {
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a GPU", "clip": ["11", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "flux", "images": ["8", 0]}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "11": {
            "class_type": "DualCLIPLoader",
            "inputs": {"clip_name1": clips[0], "clip_name2": clips[1], "type": "flux"},
        },
        "12": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": unet, "weight_dtype": "default"},
        },
        "13": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["25", 0],
                "guider": ["22", 0],
                "sampler": ["16", 0],
                "sigmas": ["17", 0],
                "latent_image": ["27", 0],
            },
        },
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "17": {
            "class_type": "BasicScheduler",
            "inputs": {"scheduler": "simple", "steps": steps, "denoise": 1.0, "model": ["12", 0]},
        },
        "22": {
            "class_type": "BasicGuider",
            "inputs": {"model": ["12", 0], "conditioning": ["26", 0]},
        },
        "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "26": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["6", 0]}},
        "27": {
            "class_type": "EmptySD3LatentImage",
            "inputs": {"width": 1024, "height": 1024, "batch_size": 1},
        },
    }
    model = ["12", 0]
    for i, lora in enumerate(loras):
        node_id = str(30 + i)
        prompt[node_id] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": model, "lora_name": lora, "strength_model": 1.0},
        }
        model = [node_id, 0]
    prompt["17"]["inputs"]["model"] = model
    prompt["22"]["inputs"]["model"] = model
    return prompt
