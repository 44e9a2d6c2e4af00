"""Builtin classifiers for the services in BACKENDS.md, registered through the plugin hook."""

from __future__ import annotations

from collections.abc import Callable

from ..hookspecs import hookimpl
from .base import Classifier, RouteClassifier

_OPENAI = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
)


class OllamaClassifier(RouteClassifier):
    name = "ollama"
    description = "Ollama: generate, chat, embed and its OpenAI/Anthropic-compatible routes"
    routes = (
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        *_OPENAI,
        "/v1/messages",
    )


class ComfyUIClassifier(RouteClassifier):
    name = "comfyui"
    description = "ComfyUI: only POST /prompt queues GPU work; GET /prompt and /queue are polls"
    routes = ("/prompt", "/api/prompt")


class VLLMClassifier(RouteClassifier):
    name = "vllm"
    description = "vLLM and other OpenAI-compatible servers: inference, embeddings, scoring"
    routes = (
        *_OPENAI,
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
        "/score",
        "/v1/score",
        "/pooling",
        "/classify",
        "/invocations",
    )


class OpenAIClassifier(VLLMClassifier):
    name = "openai"
    description = "Any OpenAI-compatible server (same routes as vllm)"


class LlamaCppClassifier(RouteClassifier):
    name = "llamacpp"
    description = "llama.cpp llama-server and llama-cpp-python: native and OpenAI routes"
    routes = (
        "/completion",
        "/completions",
        "/chat/completions",
        *_OPENAI,
        "/v1/messages",
        "/embedding",
        "/embeddings",
        "/infill",
        "/rerank",
        "/reranking",
        "/v1/rerank",
        "/models/load",
    )


class GenericClassifier(Classifier):
    name = "generic"
    description = "Any service: every POST, PUT or PATCH is GPU work; reads pass through"

    def is_gpu(self, method: str, path: str) -> bool:
        return method in ("POST", "PUT", "PATCH")


class ProcessClassifier(Classifier):
    name = "process"
    description = (
        "Managed worker (process strategy): every request, since a stopped worker answers "
        "nothing; set `classifier:` to let reads pass through"
    )

    def is_gpu(self, method: str, path: str) -> bool:
        return True


BUILTIN_CLASSIFIERS: tuple[type[Classifier], ...] = (
    OllamaClassifier,
    ComfyUIClassifier,
    VLLMClassifier,
    OpenAIClassifier,
    LlamaCppClassifier,
    GenericClassifier,
    ProcessClassifier,
)


@hookimpl
def register_classifiers(register: Callable[[type[Classifier]], None]) -> None:
    for cls in BUILTIN_CLASSIFIERS:
        register(cls)
