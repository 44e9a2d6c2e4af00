"""examples/compose.yaml: gpubroker, Ollama and ComfyUI on one GPU host. The file is parsed and
checked against the config it mounts (upstreams are compose services on the ports they listen
on, the published ports are the config's, the config passes ``serve --check``), and, where a
``docker compose`` is installed, against what compose itself makes of the file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from gpubroker.cli.main import app
from gpubroker.config.load import load_config_file
from gpubroker.config.model import Config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
COMPOSE = EXAMPLES / "compose.yaml"
KEY_VAR = "GPUBROKER_API_KEY"
KEY = "k" * 48
CONFIG_TARGET = "/etc/gpubroker/gpubroker.yaml"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = YAML(typ="safe").load(COMPOSE.read_text())
    return data


def mounted_config(services: dict[str, Any]) -> Path:
    """The host file compose mounts at the broker's config path (relative to compose.yaml)."""
    for volume in services["gpubroker"]["volumes"]:
        source, target, *_ = volume.split(":")
        if target == CONFIG_TARGET:
            return (COMPOSE.parent / source).resolve()
    raise AssertionError(f"nothing is mounted at {CONFIG_TARGET}")


def config() -> Config:
    return load_config_file(mounted_config(compose()["services"]), env={KEY_VAR: KEY})


def listen_port(service: dict[str, Any]) -> int:
    """Where a service listens inside its container: Ollama's OLLAMA_HOST, ComfyUI's --port."""
    host = (service.get("environment") or {}).get("OLLAMA_HOST")
    if host is not None:
        return int(host.rpartition(":")[2])
    argv = service["command"]
    return int(argv[argv.index("--port") + 1])


def test_the_mounted_config_passes_serve_check(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = mounted_config(compose()["services"])
    assert path.is_relative_to(EXAMPLES) and path.is_file()
    monkeypatch.setenv(KEY_VAR, KEY)
    result = CliRunner().invoke(app, ["serve", "--check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    # the broker binds beyond its container's loopback, so without the key it refuses to start
    monkeypatch.delenv(KEY_VAR)
    result = CliRunner().invoke(app, ["serve", "--check", "--config", str(path)])
    assert result.exit_code == 2 and KEY_VAR in result.output


def test_upstreams_are_compose_services_on_the_ports_they_listen_on() -> None:
    services = compose()["services"]
    cfg = config()
    for backend in cfg.backends:
        url = urlsplit(backend.upstream)
        assert url.hostname in services, f"{backend.name}: {url.hostname} is no compose service"
        service = services[url.hostname]
        assert url.port == listen_port(service), backend.name
        # reachable on the compose network, never published past the broker
        assert "ports" not in service, f"{url.hostname} is published around the broker"
        assert url.hostname in services["gpubroker"]["depends_on"]
    assert {urlsplit(b.upstream).hostname for b in cfg.backends} == {"ollama", "comfyui"}


def test_published_ports_are_the_configs_and_only_the_api_port_leaves_the_host() -> None:
    broker = compose()["services"]["gpubroker"]
    cfg = config()
    published: dict[int, str] = {}
    for entry in broker["ports"]:
        *host, container = entry.split(":")
        hostport = host[-1]
        assert hostport == container, entry  # the same number on the host: the docs hold
        published[int(container)] = host[0] if len(host) == 2 else "0.0.0.0"
    want = {cfg.api_port, cfg.status_port, *(b.proxy_port for b in cfg.backends)}
    assert set(published) == want
    assert published.pop(cfg.api_port) == "0.0.0.0"  # keyed (apiKeys): other hosts, a gateway
    assert set(published.values()) == {"127.0.0.1"}  # status and the proxies: this host only
    assert cfg.bind == "0.0.0.0"  # a published port reaches the container's own interface
    assert cfg.api_keys and cfg.api_keys[0].env == KEY_VAR
    assert KEY_VAR in broker["environment"]
    assert broker["command"][-1] == CONFIG_TARGET
    assert cfg.state_dir in {v.split(":")[1] for v in broker["volumes"]}


def test_every_service_reserves_the_gpu_through_the_nvidia_driver() -> None:
    services = compose()["services"]
    for name, service in services.items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia", name
        want = "utility" if name == "gpubroker" else "gpu"  # the broker only reads NVML
        assert want in device["capabilities"], name
    grace = int(services["gpubroker"]["stop_grace_period"].removesuffix("s"))
    assert grace > config().shutdown_grace


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    return [docker, "compose"] if probe.returncode == 0 else None


def test_docker_compose_reads_the_file_as_we_do(tmp_path: Path) -> None:
    argv = _docker_compose()
    if argv is None:
        pytest.skip("no `docker compose` here: the file is checked as YAML only")
    result = subprocess.run(
        [*argv, "-f", str(COMPOSE), "config", "--format", "json", "--no-interpolate"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path), KEY_VAR: KEY},
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)["services"]
    cfg = config()
    ports = {int(p["target"]) for p in resolved["gpubroker"]["ports"]}
    assert ports == {cfg.api_port, cfg.status_port, *(b.proxy_port for b in cfg.backends)}
    [mount] = [v for v in resolved["gpubroker"]["volumes"] if v["target"] == CONFIG_TARGET]
    assert Path(mount["source"]) == mounted_config(compose()["services"])


def test_the_image_builds_from_files_that_exist_and_serves_the_mounted_config() -> None:
    root = EXAMPLES.parent
    lines = (EXAMPLES / "Dockerfile").read_text().splitlines()
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies and all((root / src).exists() for sources in copies for src in sources)
    ignored = (EXAMPLES / "Dockerfile.dockerignore").read_text().splitlines()
    assert all(f"!{src}" in ignored for sources in copies for src in sources)
    [cmd] = [line for line in lines if line.startswith("CMD ")]
    assert json.loads(cmd.removeprefix("CMD ")) == ["serve", "--config", CONFIG_TARGET]
    broker = compose()["services"]["gpubroker"]
    assert broker["build"] == {"context": "..", "dockerfile": "examples/Dockerfile"}
