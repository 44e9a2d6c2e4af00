"""gpubroker plugin for Stable Diffusion WebUI (AUTOMATIC1111 and Forge, started with ``--api``).

Frees VRAM with ``POST /sdapi/v1/unload-checkpoint`` and brings the checkpoint back with
``POST /sdapi/v1/reload-checkpoint`` (both answer ``{}``). Generation calls are synchronous in the
WebUI's API, so a lease ends with the response; ``busy()`` still asks ``/sdapi/v1/progress`` so
that a job whose client went away keeps the GPU until it ends.
"""

from __future__ import annotations

from collections.abc import Callable

from gpubroker import Classifier, RouteClassifier, Strategy, hookimpl

__all__ = ["SDWebUIClassifier", "SDWebUIFailed", "SDWebUIStrategy"]

UNLOAD = "/sdapi/v1/unload-checkpoint"
RELOAD = "/sdapi/v1/reload-checkpoint"
PROGRESS = "/sdapi/v1/progress"


class SDWebUIFailed(Exception):
    """The WebUI refused a call; the message says what it answered."""


class SDWebUIStrategy(Strategy):
    name = "sdwebui"
    description = "Stable Diffusion WebUI (A1111/Forge): unload-checkpoint, reload-checkpoint"

    async def _post(self, path: str) -> None:
        response = await self.client.post(path)
        if response.status_code >= 400:
            raise SDWebUIFailed(
                f"POST {path} answered {response.status_code}: {response.text[:200]}"
            )

    async def unload(self) -> None:
        await self._post(UNLOAD)

    async def load(self) -> None:
        await self._post(RELOAD)

    async def busy(self) -> bool:
        response = await self.client.get(PROGRESS, params={"skip_current_image": "true"})
        if response.status_code >= 400:
            raise SDWebUIFailed(f"GET {PROGRESS} answered {response.status_code}")
        state = response.json().get("state") or {}
        return bool(state.get("job_count"))


class SDWebUIClassifier(RouteClassifier):
    name = "sdwebui"
    description = "Stable Diffusion WebUI: txt2img, img2img, upscaling (extras), interrogate"
    routes = (
        "POST /sdapi/v1/txt2img",
        "POST /sdapi/v1/img2img",
        "POST /sdapi/v1/extra-single-image",
        "POST /sdapi/v1/extra-batch-images",
        "POST /sdapi/v1/interrogate",
    )


@hookimpl
def register_strategies(register: Callable[[type[Strategy]], None]) -> None:
    register(SDWebUIStrategy)


@hookimpl
def register_classifiers(register: Callable[[type[Classifier]], None]) -> None:
    register(SDWebUIClassifier)
