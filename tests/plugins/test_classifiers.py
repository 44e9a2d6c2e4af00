"""Builtin classifiers decide by method and path; gpuPaths and strategy names override."""

from __future__ import annotations

import pytest

from gpubroker.plugins.classifiers.base import RouteClassifier
from gpubroker.plugins.manager import create_plugins
from gpubroker.runtime import make_classifier
from gpubroker.testing import make_config


@pytest.fixture(scope="module")
def plugins():  # type: ignore[no-untyped-def]
    return create_plugins(entry_points=False)


@pytest.mark.parametrize(
    "name,method,path,gpu",
    [
        ("ollama", "POST", "/api/generate", True),
        ("ollama", "POST", "/api/chat", True),
        ("ollama", "POST", "/v1/chat/completions", True),
        ("ollama", "GET", "/api/tags", False),
        ("ollama", "POST", "/api/pull", False),
        ("ollama", "GET", "/api/generate", False),
        ("comfyui", "POST", "/prompt", True),
        ("comfyui", "POST", "/api/prompt", True),
        ("comfyui", "GET", "/prompt", False),  # a UI poll, not GPU work
        ("comfyui", "GET", "/queue", False),
        ("comfyui", "POST", "/queue", False),
        ("comfyui", "POST", "/upload/image", False),
        ("vllm", "POST", "/v1/completions", True),
        ("vllm", "POST", "/v1/audio/transcriptions", True),
        ("vllm", "GET", "/v1/models", False),
        ("vllm", "POST", "/tokenize", False),
        ("llamacpp", "POST", "/completion", True),
        ("llamacpp", "GET", "/health", False),
        ("llamacpp", "GET", "/slots", False),
        # Routes the real services serve as inference that the tables once missed (a lease
        # never taken): Ollama server/routes.go, vllm 0.33.0 entrypoints, llama.cpp server.cpp.
        ("ollama", "POST", "/v1/audio/transcriptions", True),
        ("ollama", "POST", "/api/show", False),
        ("ollama", "GET", "/api/ps", False),
        ("vllm", "POST", "/v1/messages", True),
        ("vllm", "POST", "/v1/chat/completions/batch", True),
        ("vllm", "POST", "/v2/embed", True),
        ("vllm", "POST", "/inference/v1/generate", True),
        ("vllm", "POST", "/v1/messages/count_tokens", False),
        ("vllm", "POST", "/sleep", False),
        ("vllm", "GET", "/is_sleeping", False),
        ("llamacpp", "POST", "/api/chat", True),
        ("llamacpp", "POST", "/v1/reranking", True),
        ("llamacpp", "POST", "/v1/engines/copilot-codex/completions", True),
        ("llamacpp", "POST", "/tokenize", False),
        ("llamacpp", "POST", "/v1/messages/count_tokens", False),
        ("llamacpp", "GET", "/props", False),
        ("llamacpp", "GET", "/v1/models", False),
        ("generic", "POST", "/anything", True),
        ("generic", "GET", "/anything", False),
    ],
)
def test_builtin_routes(plugins, name: str, method: str, path: str, gpu: bool) -> None:  # type: ignore[no-untyped-def]
    assert plugins.classifiers[name].cls().is_gpu(method, path) is gpu


def test_classifier_follows_the_strategy_not_the_name(plugins) -> None:  # type: ignore[no-untyped-def]
    cfg = make_config(
        {"ollama-big": {"upstream": "http://127.0.0.1:1", "unloadStrategy": "ollama"}}
    )
    classifier = make_classifier(cfg.backends[0], plugins)
    assert classifier.is_gpu("POST", "/api/generate")
    assert not classifier.is_gpu("GET", "/api/ps")


def test_gpu_paths_override_the_builtin(plugins) -> None:  # type: ignore[no-untyped-def]
    cfg = make_config(
        {
            "svc": {
                "upstream": "http://127.0.0.1:1",
                "unloadStrategy": "ollama",
                "gpuPaths": ["/custom/run", "* /any/*", "PUT /put-only"],
            }
        }
    )
    classifier = make_classifier(cfg.backends[0], plugins)
    assert classifier.is_gpu("POST", "/custom/run")
    assert not classifier.is_gpu("GET", "/custom/run")  # no method = POST only
    assert classifier.is_gpu("GET", "/any/thing") and classifier.is_gpu("DELETE", "/any/x")
    assert classifier.is_gpu("PUT", "/put-only") and not classifier.is_gpu("POST", "/put-only")
    assert not classifier.is_gpu("POST", "/api/generate")  # gpuPaths replace, not extend


def test_route_classifier_glob_and_exact() -> None:
    c = RouteClassifier(["POST /v1/*", "GET /exact"])
    assert c.is_gpu("POST", "/v1/chat/completions")
    assert c.is_gpu("GET", "/exact")
    assert not c.is_gpu("GET", "/exact/more")
