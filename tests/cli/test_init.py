"""``gpubroker init``: a commented config that loads, real loopback detection, no clobbering."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from ruamel.yaml import YAML
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from typer.testing import CliRunner

from gpubroker.cli import detect
from gpubroker.cli.detect import FoundService, Probe
from gpubroker.cli.initfile import HEADER, build_document, render
from gpubroker.cli.main import app
from gpubroker.config.load import load_config_file
from gpubroker.plugins.manager import check_config_names, create_plugins
from gpubroker.telemetry.base import GpuSample

runner = CliRunner()
NO_DRIVER = "no NVIDIA driver found (libnvidia-ml.so.1 is missing)"
RTX = GpuSample(uuid="GPU-5a1c0de0-0000-4000-8000-000000000001", index=0,
                name="NVIDIA GeForce RTX 4090", memory_total=24 * 2**30)  # fmt: skip


@pytest.fixture
def no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Init sees no driver, whether or not this machine has one."""

    async def find_gpus() -> tuple[tuple[GpuSample, ...], str | None]:
        return (), NO_DRIVER

    monkeypatch.setattr(detect, "find_gpus", find_gpus)


def test_init_without_detection_writes_a_config_that_loads(clean_env: Path) -> None:
    result = runner.invoke(app, ["init", "--no-detect"])
    assert result.exit_code == 0, result.output
    path = clean_env / "gpubroker.yaml"
    assert result.stdout == "Wrote gpubroker.yaml. Next: gpubroker serve --config gpubroker.yaml\n"
    cfg = load_config_file(path)
    assert [(b.name, b.proxy_port, b.upstream, b.unload_strategy) for b in cfg.backends] == [
        ("ollama", 5001, "http://127.0.0.1:11434", "ollama"),
        ("comfyui", 5002, "http://127.0.0.1:8188", "comfyui"),
    ]
    assert cfg.gpus == "auto"
    check_config_names(cfg, create_plugins(env={}))
    text = path.read_text()
    assert text.startswith("# gpubroker configuration, written by `gpubroker init`.\n")
    assert "# not found running at init time" in text
    assert "queueTimeout: 120s    # a GPU request waiting longer gets 503" in text


def test_init_refuses_to_overwrite_without_force(clean_env: Path) -> None:
    path = clean_env / "mine.yaml"
    path.write_text("statusPort: 6000\n")
    result = runner.invoke(app, ["init", "--no-detect", "--path", str(path)])
    assert result.exit_code == 2
    assert result.stderr == f"gpubroker: {path} already exists; use --force to overwrite it.\n"
    assert path.read_text() == "statusPort: 6000\n"

    result = runner.invoke(app, ["init", "--no-detect", "-o", str(path), "--force"])
    assert result.exit_code == 0, result.output
    assert load_config_file(path).status_port == 5102


def test_init_cannot_write(clean_env: Path) -> None:
    path = clean_env / "no" / "such" / "dir" / "gpubroker.yaml"
    result = runner.invoke(app, ["init", "--no-detect", "--path", str(path)])
    assert result.exit_code == 1
    assert result.stderr == f"gpubroker: cannot write {path}: No such file or directory\n"


def test_comments_survive_a_round_trip_edit(clean_env: Path) -> None:
    assert runner.invoke(app, ["init", "--no-detect"]).exit_code == 0
    path = clean_env / "gpubroker.yaml"
    yaml = YAML(typ="rt")
    yaml.indent(mapping=2, sequence=4, offset=2)
    doc = yaml.load(path.read_text())
    doc["statusPort"] = 6100
    doc["backends"][0]["vram"] = "9GiB"
    vllm = {"name": "vllm", "proxyPort": 5003, "upstream": "http://127.0.0.1:8000"}
    doc["backends"].append({**vllm, "unloadStrategy": "vllm"})
    out = io.StringIO()
    yaml.dump(doc, out)
    path.write_text(out.getvalue())

    text = path.read_text()
    for line in HEADER.splitlines():
        assert f"# {line}\n" in text
    assert "statusPort: 6100      # status page + admin API" in text
    assert "# One entry per GPU service." in text
    assert "  - name: ollama  # not found running at init time\n" in text
    cfg = load_config_file(path)
    assert cfg.status_port == 6100
    assert cfg.backend("ollama").vram == 9 * 2**30
    assert cfg.backend("vllm").proxy_port == 5003


def ollama_app() -> Starlette:
    async def version(request: Any) -> JSONResponse:
        return JSONResponse({"version": "0.12.3"})

    return Starlette(routes=[Route("/api/version", version)])


def comfyui_app() -> Starlette:
    async def stats(request: Any) -> JSONResponse:
        return JSONResponse({"system": {"os": "posix"}, "devices": []})

    return Starlette(routes=[Route("/system_stats", stats)])


@pytest.mark.anyio
async def test_init_detects_real_loopback_services(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, loopback: Any, no_gpus: None
) -> None:
    async with loopback(ollama_app()) as ollama, loopback(comfyui_app()) as comfyui:
        probes = (
            Probe("ollama", ollama.port, ("/api/version",)),
            Probe("comfyui", comfyui.port, ("/system_stats",)),
            Probe("vllm", comfyui.port, ("/v1/models",)),  # 404 there: not vLLM
        )
        monkeypatch.setattr(detect, "find_services", partial(detect.find_services, probes=probes))
        # The CLI runs its own event loop: give it a thread so these servers keep answering.
        result = await anyio.to_thread.run_sync(runner.invoke, app, ["init"])
    assert result.exit_code == 0, result.output
    assert f"  ollama at {ollama.url} (GET /api/version -> 200)" in result.stderr
    assert f"  comfyui at {comfyui.url} (GET /system_stats -> 200)" in result.stderr
    assert f"  GPUs: {NO_DRIVER}; writing `gpus: auto`." in result.stderr

    path = clean_env / "gpubroker.yaml"
    cfg = load_config_file(path)
    assert [(b.name, b.upstream, b.unload_strategy) for b in cfg.backends] == [
        ("ollama", ollama.url, "ollama"),
        ("comfyui", comfyui.url, "comfyui"),
    ]
    assert cfg.gpus == "auto"
    text = path.read_text()
    assert "  - name: ollama  # found: GET /api/version -> 200\n" in text
    assert f"# {NO_DRIVER}; telemetry will be tried at start-up." in text


@pytest.mark.anyio
async def test_init_with_nothing_running_writes_defaults(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, no_gpus: None
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = int(sock.getsockname()[1])
    probes = (Probe("ollama", closed, ("/api/version",)),)
    monkeypatch.setattr(detect, "find_services", partial(detect.find_services, probes=probes))
    result = await anyio.to_thread.run_sync(runner.invoke, app, ["init"])
    assert result.exit_code == 0, result.output
    assert "  no services answered; writing Ollama and ComfyUI defaults." in result.stderr
    names = [b.name for b in load_config_file(clean_env / "gpubroker.yaml").backends]
    assert names == ["ollama", "comfyui"]


def test_init_writes_the_gpus_nvml_found(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def find_gpus() -> tuple[tuple[GpuSample, ...], str | None]:
        return (RTX,), None

    async def find_services() -> list[FoundService]:
        return [FoundService("ollama", 11434, "http://127.0.0.1:11434", "GET /api/version -> 200")]

    monkeypatch.setattr(detect, "find_gpus", find_gpus)
    monkeypatch.setattr(detect, "find_services", find_services)
    result = runner.invoke(app, ["init"])
    assert result.exit_code == 0, result.output
    assert f"  GPU 0: NVIDIA GeForce RTX 4090 ({RTX.uuid})" in result.stderr
    cfg = load_config_file(clean_env / "gpubroker.yaml")
    (gpu,) = cfg.gpus  # type: ignore[misc]
    assert (gpu.id, gpu.memory, gpu.reserve) == (RTX.uuid, 24 * 2**30, 512 * 2**20)
    assert cfg.backend("ollama").gpu == (0,)
    text = (clean_env / "gpubroker.yaml").read_text()
    assert "# GPUs found through NVML at init time\n" in text
    assert f"  - id: {RTX.uuid}  # GPU 0: NVIDIA GeForce RTX 4090\n" in text


def test_every_detectable_kind_writes_a_valid_backend(tmp_path: Path) -> None:
    services = [
        FoundService(probe.kind, probe.port, f"http://127.0.0.1:{probe.port}", "GET / -> 200")
        for probe in detect.PROBES
    ]
    two_gpus = (RTX, GpuSample(uuid="GPU-2", index=1, name="RTX 3090"))
    path = tmp_path / "all.yaml"
    path.write_text(render(build_document(services, two_gpus, None)))
    cfg = load_config_file(path)
    check_config_names(cfg, create_plugins(env={}))
    llamacpp = cfg.backend("llamacpp")
    assert (llamacpp.unload_strategy, llamacpp.classifier_name) == ("generic", "llamacpp")
    assert [b.proxy_port for b in cfg.backends] == [5001, 5002, 5003, 5004]
    assert all(b.gpu == () for b in cfg.backends)  # two GPUs: no guess which one
    assert [g.id for g in cfg.gpus] == [RTX.uuid, "GPU-2"]  # type: ignore[union-attr]
    assert cfg.gpus[1].memory is None  # type: ignore[index]  # unknown stays unknown
