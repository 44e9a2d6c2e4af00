"""A ComfyUI emulator: an HTTP call that returns at once while a worker does the GPU work later.

That asynchrony is what a broker must cope with (BACKENDS.md, section 2): ``POST /prompt``
only enqueues; one FIFO worker task executes prompts one at a time. Each loader node puts the
files it names on the :class:`SimGPU` (owner ``owner``; ``model_sizes`` per file, ``model_size``
for any other) and ComfyUI keeps them there as its node cache and model management do, making
room by unloading its own models (sim/comfyui_models.py, pinned there); :attr:`cached` lists
them. ``POST /free`` only sets flags that the worker applies when idle or after the current
prompt; prompts still queued then load their files again. Whether ComfyUI is busy can be learnt
only the way a real client learns it: ``GET /prompt``, ``GET /queue`` or the WebSocket.

Node execution is simulated: nodes run in dependency order from the output nodes; any node
whose class name contains ``Sampler`` runs ``inputs.steps`` (or ``steps``) progress steps
spread over ``job_seconds``. Use :func:`simple_workflow` for a valid prompt. Not reproduced:
skipping cached nodes (identical prompts run again in full; the node cache only decides which
models stay), validating inputs against the model folders, uploads, custom nodes.

Pinned to ComfyUI's own source (Comfy-Org/ComfyUI 0.3.64; file: function), because a broker
that relies on a behaviour the real service lacks fails its users, not its tests:

- server.py ``create_origin_only_middleware``: unless started with ``--enable-cors-header``,
  any request (pages, assets, API, the WebSocket upgrade) with both Host and Origin whose Host
  is a loopback name gets a bare 403 when the two differ (ports compared only when both
  carry one); any OPTIONS that passes is answered 200 (both middlewares answer preflights).
  A proxy that rewrites Host and not Origin breaks the web UI: see ``cors_header``.
- server.py ``PromptServer.add_routes``: every route also answers under ``/api/``.
- comfy/model_management.py ``get_total_memory(dev, torch_total_too=True)``:
  ``torch_vram_total`` in ``/system_stats`` is torch's reserved bytes on cuda/xpu/npu/mlu, total
  system RAM on cpu and mps, and a constant 1 GiB under DirectML (``privateuseone``): see
  ``device_type``. On cpu and mps nothing is put on the (simulated) GPU.
- execution.py ``PromptQueue``: a heap of (number, prompt_id, prompt, extra_data, outputs);
  ``GET /queue`` (server.py ``get_queue``) lists ``queue_running`` and ``queue_pending`` items in
  that layout. ComfyUI adds no timestamp of its own to ``extra_data``.
- main.py ``prompt_worker``: ``/free`` flags (``PromptQueue.set_flag``) wake the idle worker,
  which applies them after the current prompt: ``unload_models`` (or ``free_memory``) unloads
  every model (``unload_all_models``); ``free_memory`` also resets the node cache
  (``PromptExecutor.reset``).
- execution.py ``execute``: on an OOM, ComfyUI unloads every model (``unload_all_models``).
"""

from __future__ import annotations

import ipaddress
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from gpubroker.sim.comfyui_models import (
    EXTRA_RESERVED_VRAM,
    ModelCache,
    NodeCache,
    minimum_inference_memory,
    node_files,
    signatures,
)
from gpubroker.sim.gpu import GiB, OutOfMemory, SimGPU
from gpubroker.sim.service import Changed, EmulatedService
from gpubroker.sim.wire import dumps

VERSION = "0.3.64"
OUTPUT_NODES = frozenset(
    {"SaveImage", "PreviewImage", "SaveAnimatedWEBP", "SaveAnimatedPNG", "SaveVideo", "SaveAudio"}
)
PREVIEW_IMAGE = 1
"""Binary WebSocket frame type of a preview image (then a 4-byte format code: 1 JPEG, 2 PNG)."""
_PNG_FORMAT = 2
_TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def simple_workflow(
    steps: int = 4, seed: int = 0, text: str = "a GPU", ckpt: str = "sdxl.safetensors"
) -> dict[str, Any]:
    """ComfyUI's default text-to-image graph, in API format, on checkpoint ``ckpt``."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 8.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 512, "height": 512, "batch_size": 1},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
        },
    }


class _Interrupted(Exception):
    pass


class _NodeFailed(Exception):
    def __init__(self, exc: Exception, exception_type: str) -> None:
        super().__init__(str(exc))
        self.exception_type = exception_type


@dataclass(eq=False)
class _Job:
    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")

    def item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass(eq=False)
class _Client:
    """One WebSocket connection: frames wait here until its sender task writes them."""

    frames: deque[str | bytes] = field(default_factory=deque)
    changed: Changed = field(default_factory=Changed)

    def put(self, frame: str | bytes) -> None:
        self.frames.append(frame)
        self.changed.notify()


class ComfyUIEmulator(EmulatedService):
    """ComfyUI on a :class:`SimGPU`. Serve :attr:`app` (with its lifespan) to use it."""

    def __init__(
        self,
        gpu: SimGPU,
        model_size: int,
        *,
        load_seconds: float = 0.05,
        job_seconds: float = 0.2,
        steps: int = 4,
        work_size: int = 0,
        owner: str = "comfyui",
        device_type: str = "cuda",
        cors_header: str | None = None,
        model_sizes: Mapping[str, int] | None = None,
        cache_lru: int = 0,
        reserved_vram: int = EXTRA_RESERVED_VRAM,
    ) -> None:
        self.device_type = device_type
        """torch's device type: cuda (default), cpu, mps, xpu, privateuseone (DirectML); set
        it here, not later (the model cache is built for it)."""
        self.cors_header = cors_header
        """``--enable-cors-header``: None keeps the Host/Origin check, as ComfyUI's default."""
        self.origin_refusals = 0
        """Requests the Host/Origin check answered 403."""
        self.model_size = model_size
        """The size of a model file ``model_sizes`` does not name."""
        self.load_seconds = load_seconds
        self.job_seconds = job_seconds
        self.steps = steps
        self.work_size = work_size
        """Extra VRAM held while sampling (activations), freed after each sampler node."""
        self._models = ModelCache(
            gpu if self.on_gpu else None,
            owner,
            model_sizes or {},
            model_size,
            reserved=reserved_vram,
        )
        self._nodes = NodeCache(cache_lru)
        """``cache_lru``: ``--cache-lru N``; 0 is ComfyUI's default node cache."""
        self._pending: list[_Job] = []
        self._running: _Job | None = None
        self._last_node: str | None = None
        self._history: dict[str, dict[str, Any]] = {}
        self._flags: dict[str, Any] = {}
        self._interrupt = False
        self._counter = 0
        self._images = 0
        self._changed = Changed()
        self._clients: dict[str, _Client] = {}
        super().__init__(gpu, owner)
        self.app = _OriginCheck(self.app, self)  # type: ignore[assignment]

    # -- worker -------------------------------------------------------------------------------

    @property
    def loads(self) -> int:
        """How many times a model file was loaded onto the GPU."""
        return self._models.loads

    @property
    def cached(self) -> tuple[str, ...]:
        """The model files ComfyUI holds on its device now, the most recently loaded first."""
        return self._models.cached

    async def _on_started(self) -> None:
        self.spawn(self._worker)

    def _on_stopped(self) -> None:
        # The process is gone: its models and node cache with it (the GPU is freed after).
        self._models.unload_all()
        self._nodes.clear()

    async def _worker(self) -> None:
        while True:
            while not self._pending and not self._flags:
                await self._changed.wait()
            if self._pending:
                job = self._pending.pop(0)
                self._running = job
                self._queue_updated()
                try:
                    await self._execute(job)
                finally:
                    self._running = None
                    self._last_node = None
                    self._queue_updated()
                self._send("executing", {"node": None, "prompt_id": job.prompt_id}, job.client_id)
            self._apply_flags()

    def _apply_flags(self) -> None:
        flags, self._flags = self._flags, {}
        if flags.get("unload_models", flags.get("free_memory", False)):
            self._unload()
        if flags.get("free_memory", False):
            self._nodes.clear()

    def _unload(self) -> None:
        """``unload_all_models``: every model off the device (and any activations with them)."""
        self._models.unload_all()
        self.gpu.free(self.owner)

    async def _execute(self, job: _Job) -> None:
        self._interrupt = False
        messages: list[list[Any]] = []
        outputs: dict[str, Any] = {}
        executed: list[str] = []

        def message(event: str, data: dict[str, Any], *, keep: bool = True) -> None:
            if keep:
                messages.append([event, data])
            self._send(event, data, job.client_id)

        message("execution_start", {"prompt_id": job.prompt_id, "timestamp": _ms()})
        message("execution_cached", {"nodes": [], "prompt_id": job.prompt_id, "timestamp": _ms()})
        keys = signatures(job.prompt)
        self._nodes.set_prompt(set(keys.values()))
        self._models.keep_only(self._nodes.files())  # models no cached output holds are freed
        busy: set[str] = set()  # the models this prompt has loaded so far
        order = _execution_order(job.prompt, job.outputs)
        samplers = [n for n in order if "Sampler" in _class(job.prompt, n)]
        total_steps = sum(self._steps_of(job.prompt[n]) for n in samplers) or 1
        step_seconds = self.job_seconds / total_steps
        node_id = order[0]
        try:
            for node_id in order:
                class_type = _class(job.prompt, node_id)
                self._check_interrupt()
                self._last_node = node_id
                message(
                    "executing",
                    {"node": node_id, "display_node": node_id, "prompt_id": job.prompt_id},
                    keep=False,
                )
                # Loader nodes put the files they name on the GPU; a model-free workflow
                # (EmptyImage -> ImageBlur -> SaveImage) puts nothing there.
                files = node_files(job.prompt[node_id])
                await self._load(files, busy)
                if node_id in samplers:
                    steps = self._steps_of(job.prompt[node_id])
                    await self._sample(job, node_id, steps, step_seconds, busy)
                elif not samplers and not executed:
                    await anyio.sleep(self.job_seconds)
                if class_type in OUTPUT_NODES:
                    outputs[node_id] = {"images": [self._image(class_type)]}
                    message(
                        "executed",
                        {
                            "node": node_id,
                            "display_node": node_id,
                            "output": outputs[node_id],
                            "prompt_id": job.prompt_id,
                        },
                        keep=False,
                    )
                executed.append(node_id)
                self._nodes.put(keys[node_id], tuple(f for f, kind in files if kind == "model"))
        except _Interrupted:
            message(
                "execution_interrupted",
                {
                    "prompt_id": job.prompt_id,
                    "node_id": node_id,
                    "node_type": _class(job.prompt, node_id),
                    "executed": executed,
                },
            )
            self._finish(job, outputs, messages, success=False)
            return
        except _NodeFailed as exc:
            message(
                "execution_error",
                {
                    "prompt_id": job.prompt_id,
                    "node_id": node_id,
                    "node_type": _class(job.prompt, node_id),
                    "executed": executed,
                    "exception_message": str(exc),
                    "exception_type": exc.exception_type,
                    "traceback": [f"{exc.exception_type}: {exc}\n"],
                    "current_inputs": {},
                    "current_outputs": {},
                },
            )
            self._finish(job, outputs, messages, success=False)
            return
        message("execution_success", {"prompt_id": job.prompt_id, "timestamp": _ms()})
        self._finish(job, outputs, messages, success=True)

    def _finish(
        self, job: _Job, outputs: dict[str, Any], messages: list[list[Any]], *, success: bool
    ) -> None:
        self._history[job.prompt_id] = {
            "prompt": job.item(),
            "outputs": outputs,
            "status": {
                "status_str": "success" if success else "error",
                "completed": success,
                "messages": messages,
            },
            "meta": {
                node: {
                    "node_id": node,
                    "display_node": node,
                    "parent_node": None,
                    "real_node_id": node,
                }
                for node in outputs
            },
        }

    @property
    def on_gpu(self) -> bool:
        """cpu and mps keep the model in system memory: nothing lands on the GPU."""
        return self.device_type not in ("cpu", "mps")

    async def _load(self, files: Sequence[tuple[str, str]], busy: set[str]) -> None:
        """Put a node's files on the device unless there already (patches need nothing)."""
        for name, kind in files:
            if kind == "patch":
                continue
            if kind == "model" and name in self._models:
                self._models.use(name)
                busy.add(name)
                continue
            await anyio.sleep(self.load_seconds)
            try:
                if kind == "transient":
                    self._models.run_transient(name)
                else:
                    self._models.load(name, busy)
                    busy.add(name)
            except OutOfMemory as exc:
                self._unload()  # execution.py: an OOM unloads every model
                raise _NodeFailed(exc, "torch.OutOfMemoryError") from exc

    async def _sample(
        self, job: _Job, node_id: str, steps: int, step_seconds: float, busy: set[str]
    ) -> None:
        if self.work_size and self.on_gpu:
            # sampler_helpers.py prepare_sampling -> load_models_gpu(memory_required=...):
            # room for the activations first, the prompt's own models kept.
            reserved = self._models.reserved
            need = max(minimum_inference_memory(reserved), self.work_size + reserved)
            self._models.make_room(need, keep=busy)
            try:
                self.gpu.allocate(self.owner, self.work_size, tag="activations")
            except OutOfMemory as exc:
                self._unload()
                raise _NodeFailed(exc, "torch.OutOfMemoryError") from exc
        try:
            for step in range(1, steps + 1):
                await anyio.sleep(step_seconds)
                self._check_interrupt()
                data = {"value": step, "max": steps, "prompt_id": job.prompt_id, "node": node_id}
                self._send("progress", data, job.client_id)
                self._send(
                    "progress_state",
                    {
                        "prompt_id": job.prompt_id,
                        "nodes": {
                            node_id: {
                                "value": step,
                                "max": steps,
                                "state": "running",
                                "node_id": node_id,
                                "prompt_id": job.prompt_id,
                                "display_node_id": node_id,
                                "parent_node_id": None,
                                "real_node_id": node_id,
                            }
                        },
                    },
                    job.client_id,
                )
                self._send_bytes(
                    struct.pack(">II", PREVIEW_IMAGE, _PNG_FORMAT) + _TINY_PNG, job.client_id
                )
        finally:
            self.gpu.free(self.owner, tag="activations")

    def _check_interrupt(self) -> None:
        if self._interrupt:
            self._interrupt = False
            raise _Interrupted

    def _steps_of(self, node: dict[str, Any]) -> int:
        steps = node.get("inputs", {}).get("steps")
        return steps if isinstance(steps, int) and steps > 0 else self.steps

    def _image(self, class_type: str) -> dict[str, str]:
        self._images += 1
        kind = "temp" if class_type == "PreviewImage" else "output"
        return {"filename": f"ComfyUI_{self._images:05d}_.png", "subfolder": "", "type": kind}

    # -- WebSocket fan-out --------------------------------------------------------------------

    def _queue_info(self) -> dict[str, Any]:
        remaining = len(self._pending) + (1 if self._running is not None else 0)
        return {"exec_info": {"queue_remaining": remaining}}

    def _queue_updated(self) -> None:
        self._send("status", {"status": self._queue_info()}, None)

    def _send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        self._deliver(dumps({"type": event, "data": data}), sid)

    def _send_bytes(self, frame: bytes, sid: str | None) -> None:
        self._deliver(frame, sid)

    def _deliver(self, frame: str | bytes, sid: str | None) -> None:
        if sid is None:
            for client in self._clients.values():
                client.put(frame)
        elif (one := self._clients.get(sid)) is not None:
            one.put(frame)

    async def _ws(self, websocket: WebSocket) -> None:
        sid = websocket.query_params.get("clientId") or uuid.uuid4().hex
        await websocket.accept()
        client = _Client()
        self._clients[sid] = client
        client.put(dumps({"type": "status", "data": {"status": self._queue_info(), "sid": sid}}))
        running = self._running
        if running is not None and running.client_id == sid and self._last_node is not None:
            client.put(dumps({"type": "executing", "data": {"node": self._last_node}}))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._ws_reader, websocket, tg.cancel_scope)
                while True:
                    while not client.frames:
                        await client.changed.wait()
                    frame = client.frames.popleft()
                    if isinstance(frame, bytes):
                        await websocket.send_bytes(frame)
                    else:
                        await websocket.send_text(frame)
        except (WebSocketDisconnect, OSError):
            pass
        finally:
            if self._clients.get(sid) is client:
                del self._clients[sid]

    @staticmethod
    async def _ws_reader(websocket: WebSocket, scope: anyio.CancelScope) -> None:
        try:
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass
        finally:
            scope.cancel()

    # -- HTTP ---------------------------------------------------------------------------------

    def _routes(self) -> Sequence[BaseRoute]:
        routes: list[BaseRoute] = []
        for prefix in ("", "/api"):
            routes += [
                Route(f"{prefix}/prompt", self._get_prompt, methods=["GET"]),
                Route(f"{prefix}/prompt", self._post_prompt, methods=["POST"]),
                Route(f"{prefix}/queue", self._get_queue, methods=["GET"]),
                Route(f"{prefix}/queue", self._post_queue, methods=["POST"]),
                Route(f"{prefix}/history", self._get_history, methods=["GET"]),
                Route(f"{prefix}/history", self._post_history, methods=["POST"]),
                Route(f"{prefix}/history/{{prompt_id}}", self._get_history_item, methods=["GET"]),
                Route(f"{prefix}/interrupt", self._interrupt_route, methods=["POST"]),
                Route(f"{prefix}/free", self._free, methods=["POST"]),
                Route(f"{prefix}/system_stats", self._system_stats, methods=["GET"]),
                Route(f"{prefix}/object_info", self._object_info, methods=["GET"]),
                Route(f"{prefix}/embeddings", self._empty_list, methods=["GET"]),
                Route(f"{prefix}/extensions", self._empty_list, methods=["GET"]),
                Route(f"{prefix}/view", self._view, methods=["GET"]),
                WebSocketRoute(f"{prefix}/ws", self._ws),
            ]
        # The web UI: server.py serves web_root's index.html at / and its assets beside it
        # (not under /api). Ours is a stand-in that does what the real frontend's first
        # seconds do: module script and stylesheet loaded with ``crossorigin`` (so the
        # browser sends Origin), system_stats, the /ws socket, and a prompt queued on request.
        routes += [
            Route("/", self._index, methods=["GET"]),
            Route("/assets/index-emulator.js", self._asset_js, methods=["GET"]),
            Route("/assets/index-emulator.css", self._asset_css, methods=["GET"]),
        ]
        return routes

    async def _index(self, _request: Request) -> Response:
        return Response(_web("index.html"), media_type="text/html")

    async def _asset_js(self, _request: Request) -> Response:
        body = _web("index-emulator.js")
        return Response(body, media_type="application/javascript; charset=utf-8")

    async def _asset_css(self, _request: Request) -> Response:
        return Response(_web("index-emulator.css"), media_type="text/css")

    async def _get_prompt(self, _request: Request) -> Response:
        return JSONResponse(self._queue_info())

    async def _post_prompt(self, request: Request) -> Response:
        self.require_running()
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "prompt" not in body:
            return _prompt_error("no_prompt", "No prompt provided", "No prompt provided")
        prompt = body["prompt"]
        if not isinstance(prompt, dict) or not prompt:
            return _prompt_error("invalid_prompt", "Cannot execute because the prompt is invalid")
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                return _prompt_error(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
        outputs = [n for n, node in prompt.items() if node["class_type"] in OUTPUT_NODES]
        if not outputs:
            return _prompt_error("prompt_no_outputs", "Prompt has no outputs", node_errors=[])
        number: float = self._counter
        if body.get("front"):
            number = -number
        self._counter += 1
        if "number" in body:
            number = float(body["number"])
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        extra_data = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        self._pending.append(_Job(number, prompt_id, prompt, extra_data, outputs))
        self._pending.sort(key=lambda job: job.number)
        self._changed.notify()
        self._queue_updated()
        return JSONResponse({"prompt_id": prompt_id, "number": number, "node_errors": {}})

    async def _get_queue(self, _request: Request) -> Response:
        running = [self._running.item()] if self._running is not None else []
        return JSONResponse(
            {"queue_running": running, "queue_pending": [job.item() for job in self._pending]}
        )

    async def _post_queue(self, request: Request) -> Response:
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        if body.get("clear"):
            self._pending.clear()
        if isinstance(body.get("delete"), list):
            doomed = set(body["delete"])
            self._pending = [job for job in self._pending if job.prompt_id not in doomed]
        self._queue_updated()
        return Response(status_code=200)

    async def _get_history(self, request: Request) -> Response:
        items = list(self._history.items())
        max_items = request.query_params.get("max_items")
        if max_items and max_items.isdigit():
            items = items[-int(max_items) :] if int(max_items) else []
        return JSONResponse(dict(items))

    async def _get_history_item(self, request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]
        entry = self._history.get(prompt_id)
        return JSONResponse({prompt_id: entry} if entry is not None else {})

    async def _post_history(self, request: Request) -> Response:
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        if body.get("clear"):
            self._history.clear()
        for prompt_id in body.get("delete") or []:
            self._history.pop(prompt_id, None)
        return Response(status_code=200)

    async def _interrupt_route(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        target = body.get("prompt_id") if isinstance(body, dict) else None
        running = self._running
        if target is None or (running is not None and running.prompt_id == target):
            self._interrupt = running is not None
        return Response(status_code=200)

    async def _free(self, request: Request) -> Response:
        body = await _json_object(request)
        if isinstance(body, Response):
            return body
        if body.get("unload_models"):
            self._flags["unload_models"] = body["unload_models"]
        if body.get("free_memory"):
            self._flags["free_memory"] = body["free_memory"]
        self._changed.notify()
        return Response(status_code=200)

    def _device(self) -> dict[str, Any]:
        """``devices[0]`` as comfy/model_management.py reports it for ``device_type``."""
        gpu, kind = self.gpu, self.device_type
        if kind in ("cpu", "mps"):  # psutil's system memory stands in for VRAM
            ram, free = 64 * GiB, 48 * GiB
            name = "cpu" if kind == "cpu" else "mps"
            return {"name": name, "type": kind, "index": None, "vram_total": ram,
                    "vram_free": free, "torch_vram_total": ram,
                    "torch_vram_free": free}  # fmt: skip
        if kind == "privateuseone":  # DirectML: a constant "#TODO" 1 GiB
            return {"name": "privateuseone:0", "type": kind, "index": 0, "vram_total": GiB,
                    "vram_free": GiB, "torch_vram_total": GiB, "torch_vram_free": GiB}  # fmt: skip
        return {
            "name": f"{kind}:{gpu.index} {gpu.name} : cudaMallocAsync",
            "type": kind,
            "index": gpu.index,
            "vram_total": gpu.total,
            "vram_free": gpu.free_bytes,
            "torch_vram_total": gpu.held(self.owner),  # torch's reserved bytes
            "torch_vram_free": 0,
        }

    async def _system_stats(self, _request: Request) -> Response:
        return JSONResponse(
            {
                "system": {
                    "os": "posix",
                    "ram_total": 64 * GiB,
                    "ram_free": 48 * GiB,
                    "comfyui_version": VERSION,
                    "required_frontend_version": "1.28.8",
                    "python_version": sys.version,
                    "pytorch_version": "2.8.0+cu128",
                    "embedded_python": False,
                    "argv": ["main.py", "--listen"]
                    + (["--cpu"] if self.device_type == "cpu" else []),
                },
                "devices": [self._device()],
            }
        )

    async def _object_info(self, _request: Request) -> Response:
        def node(name: str, category: str, output: list[str], output_node: bool = False) -> Any:
            return {
                "input": {"required": {}},
                "output": output,
                "output_is_list": [False] * len(output),
                "output_name": output,
                "name": name,
                "display_name": name,
                "description": "",
                "category": category,
                "output_node": output_node,
            }

        return JSONResponse(
            {
                "CheckpointLoaderSimple": node(
                    "CheckpointLoaderSimple", "loaders", ["MODEL", "CLIP", "VAE"]
                ),
                "CLIPTextEncode": node("CLIPTextEncode", "conditioning", ["CONDITIONING"]),
                "EmptyLatentImage": node("EmptyLatentImage", "latent", ["LATENT"]),
                "KSampler": node("KSampler", "sampling", ["LATENT"]),
                "VAEDecode": node("VAEDecode", "latent", ["IMAGE"]),
                "SaveImage": node("SaveImage", "image", [], output_node=True),
                "PreviewImage": node("PreviewImage", "image", [], output_node=True),
            }
        )

    async def _empty_list(self, _request: Request) -> Response:
        return JSONResponse([])

    async def _view(self, request: Request) -> Response:
        if not request.query_params.get("filename"):
            return Response(status_code=404)
        return Response(_TINY_PNG, media_type="image/png")


def _web(name: str) -> bytes:
    """A file of the web UI stand-in (comfyui_web/, shipped in the package)."""
    return (resources.files("gpubroker.sim") / "comfyui_web" / name).read_bytes()


def _class(prompt: dict[str, Any], node_id: str) -> str:
    return str(prompt[node_id]["class_type"])


def _execution_order(prompt: dict[str, Any], outputs: list[str]) -> list[str]:
    """The nodes the outputs depend on, each after its inputs (links are ``[node_id, slot]``)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(node_id: str) -> None:
        if node_id in seen or node_id not in prompt:
            return
        seen.add(node_id)
        for value in (prompt[node_id].get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                visit(value[0])
        order.append(node_id)

    for node_id in outputs:
        visit(node_id)
    return order


def _ms() -> int:
    return int(time.time() * 1000)


def _prompt_error(kind: str, message: str, details: str = "", node_errors: Any = None) -> Response:
    error = {"type": kind, "message": message, "details": details, "extra_info": {}}
    return JSONResponse(
        {"error": error, "node_errors": {} if node_errors is None else node_errors},
        status_code=400,
    )


async def _json_object(request: Request) -> dict[str, Any] | Response:
    """The JSON body; 400 when it is not JSON (aiohttp would fail the handler)."""
    try:
        body = await request.json()
    except ValueError:
        return Response("400: request body must be JSON", status_code=400)
    return body if isinstance(body, dict) else {}


def is_loopback_host(hostname: str | None) -> bool:
    """server.py ``is_loopback``: an IP literal that is loopback, or a name resolving only
    to loopback. Names are not resolved here (no blocking lookups in an emulator): localhost
    and ``*.localhost`` stand for the names that do (RFC 6761)."""
    if not hostname:
        return False
    try:
        return ipaddress.ip_address(hostname.strip("[]")).is_loopback
    except ValueError:
        name = hostname.lower().rstrip(".")
        return name == "localhost" or name.endswith(".localhost")


def origin_refused(host: str | None, origin: str | None) -> bool:
    """server.py ``create_origin_only_middleware``: would ComfyUI answer this with 403?

    Only when both headers are there and Host is a loopback name: the Host and the Origin's
    netloc must then be equal, ports compared only when both sides carry one.
    """
    if not host or not origin:
        return False
    host_domain = host.lower()
    parsed = urlsplit(origin)
    origin_domain = parsed.netloc.lower()
    host_parsed = urlsplit("//" + host_domain)
    if not is_loopback_host(host_parsed.hostname):
        return False
    if parsed.port is None:  # "if origin doesn't have a port strip it from the host"
        host_domain = host_parsed.hostname or ""
    if host_parsed.port is None:
        origin_domain = parsed.hostname or ""
    return bool(host_domain and origin_domain and host_domain != origin_domain)


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    """server.py ``create_cors_middleware``: what ``--enable-cors-header`` adds to answers."""
    return [
        (b"access-control-allow-origin", origin.encode()),
        (b"access-control-allow-methods", b"POST, GET, DELETE, PUT, OPTIONS"),
        (b"access-control-allow-headers", b"Content-Type, Authorization"),
        (b"access-control-allow-credentials", b"true"),
    ]


class _OriginCheck:
    """ComfyUI's default origin-only middleware in front of the emulator's app (raw ASGI).

    It covers every route, static files and the WebSocket upgrade alike, and answers a bare
    403 (aiohttp ``web.Response(status=403)``: no body). With ``cors_header`` set it is
    replaced, as ``--enable-cors-header`` does, by permissive CORS headers.
    """

    def __init__(self, app: Any, service: ComfyUIEmulator) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:  # aiohttp's request.headers[...] is the first one
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        cors = self.service.cors_header
        if cors is None and origin_refused(headers.get("host"), headers.get("origin")):
            self.service.origin_refusals += 1
            if scope["type"] == "websocket":
                await receive()  # websocket.connect
                await send({"type": "websocket.http.response.start", "status": 403,
                            "headers": [(b"content-length", b"0")]})  # fmt: skip
                await send({"type": "websocket.http.response.body", "body": b""})
                return
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-length", b"0")]})  # fmt: skip
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            # server.py: both middlewares answer OPTIONS with an empty 200 themselves
            extra = _cors_headers(cors) if cors is not None else []
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"0"), *extra]})  # fmt: skip
            await send({"type": "http.response.body", "body": b""})
            return
        if cors is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), *_cors_headers(cors)]
            await send(message)

        await self.app(scope, receive, with_cors)
