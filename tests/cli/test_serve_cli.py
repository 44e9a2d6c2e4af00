"""`gpubroker serve` as a real process, and the admin commands against a running broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import anyio
import httpx
import pytest
from typer.testing import CliRunner

from gpubroker.cli.main import app
from gpubroker.sim import GenericEmulator, GiB, OllamaEmulator, SimGPU, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_sigterm_lets_in_flight_streams_finish_then_exits_0(
    tmp_path: Path, broker_server: str
) -> None:
    gpu = SimGPU(8 * GiB)
    gen = GenericEmulator(gpu, 2 * GiB, token_interval=0.05, tokens=30)
    async with running(gen.app) as upstream:
        status_port, proxy_port = free_port(), free_port()
        cfg = tmp_path / "gpubroker.yaml"
        cfg.write_text(
            f"statusPort: {status_port}\nshutdownGrace: 10s\nserver: {broker_server}\n"
            "backends:\n"
            f"  - name: gen\n    proxyPort: {proxy_port}\n    upstream: {upstream}\n"
            "    unloadStrategy: generic\n"
        )
        exe = Path(sys.executable).with_name("gpubroker")
        env = {**os.environ, "GPUBROKER_DISABLE_PLUGINS": ""}
        async with await anyio.open_process([str(exe), "serve", "-c", str(cfg)], env=env) as proc:
            try:
                async with httpx.AsyncClient(timeout=10) as client:
                    with anyio.fail_after(15):
                        while True:
                            try:
                                await client.get(f"http://127.0.0.1:{status_port}/health")
                                break
                            except httpx.ConnectError:
                                await anyio.sleep(0.05)
                    lines: list[str] = []
                    url = f"http://127.0.0.1:{proxy_port}/generate"
                    async with client.stream("POST", url, json={"format": "sse"}) as r:
                        async for line in r.aiter_lines():
                            if line and not lines:
                                proc.send_signal(signal.SIGTERM)  # mid-stream
                            if line:
                                lines.append(line)
                with anyio.fail_after(15):
                    code = await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
    assert lines[-1] == "data: [DONE]"
    assert len([x for x in lines if '"token"' in x]) == 30
    assert code == 0


async def test_admin_commands_against_a_running_broker() -> None:
    gpu = SimGPU(8 * GiB)
    ollama = OllamaEmulator(gpu, {"llama3.2:latest": 3 * GiB})
    async with running(ollama.app) as o:
        cfg = make_config({"ollama": {"upstream": o, "unloadStrategy": "ollama"}})
        async with broker_running(cfg) as ep:
            url = ["--url", ep.status_url]

            def cli(*args: str):  # type: ignore[no-untyped-def]
                return anyio.to_thread.run_sync(lambda: runner.invoke(app, list(args)))

            swapped = await cli("swap", "ollama", *url)
            assert swapped.exit_code == 0, swapped.output
            assert "ollama owns the GPU" in swapped.output
            async with httpx.AsyncClient() as client:
                body = {"model": "llama3.2", "prompt": "hi", "stream": False}
                await client.post(ep.proxies["ollama"] + "/api/generate", json=body)
            assert ollama.resident()
            status = await cli("status", *url, "--json")
            assert json.loads(status.output)["vramOwner"] == "ollama"
            table = await cli("status", *url)
            assert "GPU owner: ollama" in table.output
            unloaded = await cli("unload", "ollama", *url, "--json")
            assert unloaded.exit_code == 0, unloaded.output
            assert json.loads(unloaded.output)["unloaded"] == ["ollama"]
            assert not ollama.resident()
            unknown = await cli("unload", "nope", *url)
            assert unknown.exit_code == 1 and "no backend named 'nope'" in unknown.output
            usage = await cli("unload", *url)
            assert usage.exit_code == 2
            everything = await cli("unload", "--all", *url)
            assert everything.exit_code == 0 and "nothing" in everything.output


def test_unreachable_broker_exits_3_with_a_hint() -> None:
    result = runner.invoke(app, ["status", "--url", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 3
    assert "gpubroker serve" in result.output
    assert "Traceback" not in result.output


def test_serve_on_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "gpubroker.yaml"
        cfg.write_text(
            f"statusPort: {free_port()}\ntelemetry: none\nbackends:\n  - name: a\n"
            f"    proxyPort: {port}\n    upstream: http://127.0.0.1:9\n"
        )
        result = runner.invoke(app, ["serve", "-c", str(cfg)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port} for a" in result.output
    assert "Traceback" not in result.output


def test_a_config_with_no_backends_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "gpubroker.yaml"
    cfg.write_text("statusPort: 5102\n")
    result = runner.invoke(app, ["serve", "--check", "-c", str(cfg)])
    assert result.exit_code == 2
    assert "no backends to serve" in result.output


def test_bad_url_is_a_usage_error() -> None:
    result = runner.invoke(app, ["status", "--url", "http://[::1"])
    assert result.exit_code == 2 and "is not a URL" in result.output
    result = runner.invoke(app, ["unload", "x", "--url", "notaurl"])
    assert result.exit_code == 2 and "status URL" in result.output
