"""Builtin classifiers for the services in BACKENDS.md, registered through the plugin hook."""

from __future__ import annotations

from gpubroker.plugins.classifiers.base import Classifier, RouteClassifier

_OPENAI = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
)


class OllamaClassifier(RouteClassifier):
    name = "ollama"
    description = "Ollama: generate, chat, embed and its OpenAI/Anthropic-compatible routes"
    # server/routes.go: (*Server).GenerateRoutes — every route whose handler is GenerateHandler,
    # ChatHandler or EmbedHandler/EmbeddingsHandler (those schedule a runner). /api/show,
    # /api/ps, /api/tags, /v1/models and /api/pull|create|copy|delete never touch the GPU.
    routes = (
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        *_OPENAI,
        "/v1/audio/transcriptions",  # middleware.TranscriptionMiddleware -> ChatHandler
        "/v1/messages",
    )


class ComfyUIClassifier(RouteClassifier):
    name = "comfyui"
    description = "ComfyUI: only POST /prompt queues GPU work; GET /prompt and /queue are polls"
    routes = ("/prompt", "/api/prompt")


class VLLMClassifier(RouteClassifier):
    name = "vllm"
    description = "vLLM and other OpenAI-compatible servers: inference, embeddings, scoring"
    # vllm 0.33.0 (wheel from PyPI): every POST route under vllm/entrypoints/ whose handler is
    # wrapped in @load_aware_call (vLLM's own mark for work that loads the engine), less
    # /v1/messages/count_tokens (tokenizer only) and /v1/responses/{id}/cancel. The
    # /v1/realtime WebSocket is GPU work too, but WebSockets never take a lease.
    routes = (
        *_OPENAI,
        "/v1/chat/completions/batch",
        "/v1/messages",  # anthropic/api_router.py
        "/v2/embed",
        "/cohere/v2/chat",
        "/generative_scoring",
        "/inference/v1/generate",  # scale_out/token_in_token_out (--enable-scale-out)
        "/v1/decisions",
        "/v1/systemone",
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
    # llama.cpp tools/server/server.cpp: main() — the ctx_http.post() table: every route bound to
    # post_completions*, post_chat_completions, post_responses_oai, post_anthropic_messages,
    # post_infill, post_embeddings* and post_rerank; router mode's /models/load starts a model.
    # Not GPU work: /tokenize, /detokenize, /apply-template, /v1/messages/count_tokens, POST
    # /props, /lora-adapters, /slots/:id_slot, /models/unload. llama-cpp-python
    # (llama_cpp/server/app.py) adds /v1/engines/copilot-codex/completions.
    routes = (
        "/completion",
        "/completions",
        "/chat/completions",
        *_OPENAI,
        "/api/chat",  # Ollama-compatible chat
        "/v1/messages",
        "/embedding",
        "/embeddings",
        "/infill",
        "/rerank",
        "/reranking",
        "/v1/rerank",
        "/v1/reranking",
        "/models/load",
        "/v1/engines/copilot-codex/completions",
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
