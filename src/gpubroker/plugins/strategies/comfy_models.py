"""The model files a ComfyUI workflow names, read from its API-format prompt.

A ``POST /prompt`` body carries ``{"prompt": {"<node id>": {"class_type": ..., "inputs":
{...}}}}``; an input is a literal or a link ``[node_id, slot]`` to another node's output
(server.py ``post_prompt``, execution.py ``validate_prompt``). Loader nodes name their file
in a combo input whose options are ``folder_paths.get_filename_list(<folder>)``: that is what
:data:`LOADER_INPUTS` lists, pinned to Comfy-Org/ComfyUI a125cd84b054 (2025-10-12; nodes.py
and comfy_extras/). Custom nodes are not known by class, but many reuse the core input names
(``UnetLoaderGGUF.unet_name``, ``CLIPLoaderGGUF.clip_name``...): :data:`FILE_INPUTS` are read
on any node.

Kept apart from the emulator's own node table (sim/comfyui_models.py) on purpose: one stands
for the broker's reading, the other for ComfyUI, so each checks the other in the tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LOADER_INPUTS: Mapping[str, tuple[str, ...]] = {
    # nodes.py
    "CheckpointLoader": ("ckpt_name",),  # its config_name is a yaml, not weights
    "CheckpointLoaderSimple": ("ckpt_name",),
    "unCLIPCheckpointLoader": ("ckpt_name",),
    "DiffusersLoader": ("model_path",),  # a folder under models/diffusers
    "LoraLoader": ("lora_name",),
    "LoraLoaderModelOnly": ("lora_name",),
    "VAELoader": ("vae_name",),
    "ControlNetLoader": ("control_net_name",),
    "DiffControlNetLoader": ("control_net_name",),
    "UNETLoader": ("unet_name",),
    "CLIPLoader": ("clip_name",),
    "DualCLIPLoader": ("clip_name1", "clip_name2"),
    "CLIPVisionLoader": ("clip_name",),
    "StyleModelLoader": ("style_model_name",),
    "GLIGENLoader": ("gligen_name",),
    # comfy_extras/
    "TripleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3"),  # nodes_sd3.py
    "QuadrupleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3", "clip_name4"),  # hidream
    "CreateHookLora": ("lora_name",),  # nodes_hooks.py
    "CreateHookLoraModelOnly": ("lora_name",),
    "CreateHookModelAsLora": ("ckpt_name",),
    "CreateHookModelAsLoraModelOnly": ("ckpt_name",),
    "HypernetworkLoader": ("hypernetwork_name",),  # nodes_hypernetwork.py
    "ModelPatchLoader": ("name",),  # nodes_model_patch.py
    "PhotoMakerLoader": ("photomaker_model_name",),  # nodes_photomaker.py
    "TrainLoraNode": ("existing_lora",),  # nodes_train.py; "[None]" when it starts afresh
    "UpscaleModelLoader": ("model_name",),  # nodes_upscale_model.py
    "ImageOnlyCheckpointLoader": ("ckpt_name",),  # nodes_video_model.py
    "AudioEncoderLoader": ("audio_encoder_name",),  # nodes_audio_encoder.py
}
"""Core node class -> its inputs that name a model file, in ComfyUI's declared order."""

FILE_INPUTS: frozenset[str] = frozenset(
    {
        "ckpt_name",
        "unet_name",
        "clip_name",
        "clip_name1",
        "clip_name2",
        "clip_name3",
        "clip_name4",
        "vae_name",
        "lora_name",
        "control_net_name",
        "style_model_name",
        "gligen_name",
        "hypernetwork_name",
        "photomaker_model_name",
        "audio_encoder_name",
    }
)
"""Input names that mean a model file on any node, a custom one too. ``model_name``, ``name``
and ``model_path`` are left to the classes above: custom nodes use them for anything."""

NOT_FILES: frozenset[str] = frozenset({"", "None", "[None]", "pixel_space"})
"""Values that name no file: the "none" choices of optional loaders (TrainLoraNode's
``[None]``) and VAELoader's ``pixel_space``, which loads nothing (nodes.py ``load_vae``)."""


def workflow_models(prompt: Mapping[str, Any]) -> tuple[str, ...]:
    """The model files ``prompt`` (the ``"prompt"`` of a /prompt body) names, each once.

    In the order they first appear (nodes as the body lists them, inputs as each node
    lists them). Only literal strings count: a link is another node's output, decided at run
    time. Total: any JSON value gives a tuple, ``()`` when it is not a workflow.
    """
    if not isinstance(prompt, Mapping):
        return ()
    found: dict[str, None] = {}
    for node in prompt.values():
        if not isinstance(node, Mapping):
            continue
        inputs = node.get("inputs")
        if not isinstance(inputs, Mapping):
            continue
        class_type = node.get("class_type")
        declared = LOADER_INPUTS.get(class_type, ()) if isinstance(class_type, str) else ()
        for name, value in inputs.items():
            named = name in declared or name in FILE_INPUTS
            if named and isinstance(value, str) and value not in NOT_FILES:
                found.setdefault(value, None)
    return tuple(found)
