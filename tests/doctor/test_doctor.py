"""`gpubroker doctor` against real emulators on loopback: the findings, their fixes, the JSON
shape and the exit code, as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from typer.testing import CliRunner

import gpubroker
from gpubroker.cli.main import app
from gpubroker.sim import ComfyUIEmulator, GenericEmulator, GiB, OllamaEmulator, SimGPU, running
from gpubroker.sim import ollama as ollama_sim
from gpubroker.sim import vllm as vllm_sim
from gpubroker.sim.vllm import VLLMEmulator
from processes import free_port

pytestmark = pytest.mark.anyio
runner = CliRunner()
EXE = Path(sys.executable).with_name("gpubroker")
TESTS = Path(__file__).resolve().parents[1]
Findings = list[dict[str, Any]]


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child process, importing the gpubroker under test wherever the
    child's working directory is."""
    here = str(Path(gpubroker.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "GPUBROKER_DISABLE_PLUGINS": "", **extra}


def write(path: Path, top: str, *backends: str) -> Path:
    """A config: ``top`` lines, then each backend as a YAML flow mapping."""
    body = "".join(f"  - {{{b}}}\n" for b in backends)
    path.write_text(f"statusPort: {free_port()}\n{top}backends:\n{body}", encoding="utf-8")
    return path


def backend(name: str, upstream: str, strategy: str, **extra: Any) -> str:
    keys = {"name": name, "proxyPort": free_port(), "upstream": upstream,
            "unloadStrategy": strategy, **extra}  # fmt: skip
    return ", ".join(f"{k}: {json.dumps(v)}" for k, v in keys.items())


async def doctor(config: Path, *args: str) -> tuple[int, Findings, str]:
    """The real CLI (in a thread: it runs its own event loop); exit code, findings, stderr."""
    result = await anyio.to_thread.run_sync(
        lambda: runner.invoke(app, ["doctor", "-c", str(config), "--json", *args])
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout), result.stderr


def find(findings: Findings, **match: Any) -> list[dict[str, Any]]:
    return [f for f in findings if all(f[k] == v for k, v in match.items())]


def one(findings: Findings, **match: Any) -> dict[str, Any]:
    found = find(findings, **match)
    assert len(found) == 1, (match, findings)
    return found[0]


async def test_a_sound_setup_exits_0_and_prints_its_findings_as_json(
    clean_env: Path,
) -> None:
    gpu = SimGPU(24 * GiB)
    o = OllamaEmulator(gpu, {"llama3.2:latest": 2 * GiB})
    v = VLLMEmulator(gpu, "qwen", 4 * GiB, 2 * GiB)
    c = ComfyUIEmulator(gpu, 3 * GiB)
    g = GenericEmulator(gpu, 1 * GiB)
    async with (
        running(o.app) as uo,
        running(v.app) as uv,
        running(c.app) as uc,
        running(g.app) as ug,
    ):
        cfg = write(
            clean_env / "gpubroker.yaml",
            "telemetry: none\n",
            backend("ollama", uo, "ollama"),
            backend("vllm", uv, "vllm"),
            backend("comfy", uc, "comfyui"),
            backend("gen", ug, "generic", healthPath="/health"),
        )
        code, findings, _ = await doctor(cfg)
    assert code == 0
    for f in findings:
        assert set(f) == {"check", "severity", "backend", "message", "fix", "facts"}
        assert f["severity"] in ("error", "warning", "info", "ok")
    assert not find(findings, severity="error")
    seen = one(findings, check="upstream", backend="ollama", severity="ok")
    assert seen["facts"]["version"] == ollama_sim.VERSION
    assert one(findings, check="upstream", backend="vllm")["facts"]["version"] == vllm_sim.VERSION
    ready = one(findings, check="vllm", backend="vllm", severity="ok")
    assert ready["facts"]["devMode"] is True and ready["facts"]["sleepMode"] is True
    assert ready["facts"]["sleepModeFrom"] == "/server_info"
    assert one(findings, check="upstream", backend="comfy")["facts"]["device"] == "cuda"
    assert not find(findings, check="comfyui")  # on the GPU: nothing to say
    assert one(findings, check="upstream", backend="gen", severity="ok")["facts"]["status"] == 200
    assert one(findings, check="ports", severity="ok")["message"].startswith("free to listen")
    assert one(findings, check="gpu")["severity"] == "info"  # telemetry: none


async def test_vllm_without_dev_mode_or_sleep_mode_is_an_error(clean_env: Path) -> None:
    gpu = SimGPU(24 * GiB)
    no_dev = VLLMEmulator(gpu, "a", 2 * GiB, 1 * GiB, dev_mode=False, owner="a")
    no_sleep = VLLMEmulator(gpu, "b", 2 * GiB, 1 * GiB, sleep_mode=False, owner="b")
    async with running(no_dev.app) as ua, running(no_sleep.app) as ub:
        cfg = write(
            clean_env / "gpubroker.yaml",
            "telemetry: none\n",
            backend("nodev", ua, "vllm"),
            backend("nosleep", ub, "vllm"),
        )
        code, findings, _ = await doctor(cfg)
    assert code == 1
    dev = one(findings, check="vllm", backend="nodev", severity="error")
    assert "VLLM_SERVER_DEV_MODE=1" in dev["message"] and dev["facts"]["devMode"] is False
    assert "--enable-sleep-mode" in dev["fix"]
    sleep = one(findings, check="vllm", backend="nosleep", severity="error")
    assert "--enable-sleep-mode" in sleep["message"]
    assert sleep["facts"]["sleepMode"] is False
    assert sleep["facts"]["sleepModeFrom"] == "/server_info"


async def test_a_cpu_comfyui_is_a_warning(clean_env: Path) -> None:
    comfy = ComfyUIEmulator(SimGPU(8 * GiB), 2 * GiB, device_type="cpu")
    async with running(comfy.app) as url:
        cfg = write(clean_env / "gpubroker.yaml", "telemetry: none\n",
                    backend("comfy", url, "comfyui"))  # fmt: skip
        code, findings, _ = await doctor(cfg)
    assert code == 0  # a warning is no error
    cpu = one(findings, check="comfyui", backend="comfy")
    assert cpu["severity"] == "warning" and "CPU" in cpu["message"]
    assert cpu["facts"]["device"] == "cpu" and "--cpu" in cpu["fix"]


@contextmanager
def listening_socket() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


async def test_dead_and_hung_upstreams_and_a_stranger_on_a_port(clean_env: Path) -> None:
    dead = free_port()
    with listening_socket() as hung, listening_socket() as taken:
        cfg = clean_env / "gpubroker.yaml"
        cfg.write_text(
            f"statusPort: {taken}\ntelemetry: none\nbackends:\n"
            f"  - {{{backend('dead', f'http://127.0.0.1:{dead}', 'ollama')}}}\n"
            f"  - {{{backend('hung', f'http://127.0.0.1:{hung}', 'vllm')}}}\n"
        )
        code, findings, stderr = await doctor(cfg)
    assert code == 1
    down = one(findings, check="upstream", backend="dead")
    assert down["severity"] == "error" and "cannot connect" in down["message"]
    assert down["facts"]["reachable"] is False and "start Ollama" in down["fix"]
    stuck = one(findings, check="upstream", backend="hung")
    assert stuck["severity"] == "error" and "did not answer in time" in stuck["message"]
    port = one(findings, check="ports", severity="error")
    assert port["facts"] == {"port": taken, "key": "statusPort", "pid": os.getpid(),
                             "gpubroker": False}  # fmt: skip
    assert "give statusPort another port" in port["fix"]
    slow = [line for line in stderr.splitlines() if "still checking:" in line]
    assert slow and "hung (http://127.0.0.1:" in slow[0]  # the slow check named as it runs


async def test_managed_workers_commands_and_the_settings_they_would_start_with(
    clean_env: Path,
) -> None:
    dead, dead2 = free_port(), free_port()
    cfg = write(
        clean_env / "gpubroker.yaml",
        "telemetry: none\npolicy: budget\n",
        backend(
            "ollama", f"http://127.0.0.1:{dead}", "ollama",
            command=["no-such-ollama-here", "serve"],
            env={"OLLAMA_KEEP_ALIVE": "0", "OLLAMA_MAX_LOADED_MODELS": "1"},
        ),
        backend(
            "vllm", f"http://127.0.0.1:{dead2}", "vllm",
            command=[sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port",
                     "{port}"],
        ),
    )  # fmt: skip
    code, findings, _ = await doctor(cfg)
    assert code == 1
    missing = one(findings, check="command", backend="ollama")
    assert missing["severity"] == "error" and "not found on PATH" in missing["message"]
    assert one(findings, check="command", backend="vllm")["severity"] == "ok"  # python exists
    waiting = one(findings, check="upstream", backend="ollama")
    assert waiting["severity"] == "info" and "managed worker" in waiting["message"]
    [keep] = [f for f in find(findings, check="ollama") if "KEEP_ALIVE=0" in f["message"]]
    assert keep["severity"] == "warning" and keep["backend"] == "ollama"
    assert "OLLAMA_KEEP_ALIVE=0" in keep["message"] and "OLLAMA_KEEP_ALIVE=-1" in keep["fix"]
    assert keep["facts"]["source"] == "its command: in the config"
    most = [f for f in find(findings, check="ollama") if "MAX_LOADED" in f["message"]]
    assert len(most) == 1 and most[0]["severity"] == "warning"
    vllm = find(findings, check="vllm", backend="vllm", severity="error")
    assert {("DEV_MODE" in f["message"], "sleep-mode" in f["message"]) for f in vllm} == {
        (True, False),
        (False, True),
    }
    assert all("would start" in f["message"] for f in vllm)


async def test_config_warnings_and_declared_sizes(clean_env: Path) -> None:
    generic = GenericEmulator(SimGPU(8 * GiB), GiB)
    async with running(generic.app) as url:
        budget = write(
            clean_env / "budget.yaml",
            "telemetry: none\npolicy: budget\nholdTime: 70s\n"
            "gpus: [{id: 0, memory: 8GiB, reserve: 1GiB}]\n",
            backend("big", url, "generic", vram="12GiB", startTimeout="5m"),
        )
        code, findings, _ = await doctor(budget)
        exclusive = write(
            clean_env / "exclusive.yaml",
            "telemetry: none\n",
            backend("a", url, "generic", exclusiveWith=["b"]),
            backend("b", url, "generic"),
        )
        code2, findings2, _ = await doctor(exclusive)
    assert code == 1
    hold = [f for f in find(findings, check="config") if "holdTime" in f["message"]]
    assert len(hold) == 1 and hold[0]["severity"] == "warning" and "1m" in hold[0]["message"]
    start = one(findings, check="config", backend="big", severity="warning")
    assert "startTimeout" in start["message"]
    size = one(findings, check="config", backend="big", severity="error")
    assert size["facts"] == {"declared": 12 * GiB, "capacity": 7 * GiB, "gpu": "0"}
    assert "507" in size["message"]
    assert code2 == 0
    note = one(findings2, check="config", severity="info")
    assert "exclusiveWith" in note["message"] and "policy: budget" in note["message"]


async def test_a_config_that_does_not_load_is_one_located_error(clean_env: Path) -> None:
    cfg = clean_env / "gpubroker.yaml"
    cfg.write_text("statusPort: 5102\nbackends:\n  - name: x\n    proxyPort: nope\n")
    code, findings, _ = await doctor(cfg)
    assert code == 1
    assert len(findings) == 1 and findings[0]["severity"] == "error"
    assert f"{cfg}:4:" in findings[0]["message"]
    text = await anyio.to_thread.run_sync(lambda: runner.invoke(app, ["doctor", "-c", str(cfg)]))
    assert text.exit_code == 1 and "Traceback" not in text.output
    assert "fix: correct the file" in text.stdout and "1 error" in text.stdout


async def test_no_gpu_here_is_a_finding_never_a_traceback(clean_env: Path) -> None:
    generic = GenericEmulator(SimGPU(8 * GiB), GiB)
    async with running(generic.app) as url:
        cfg = write(clean_env / "gpubroker.yaml", "", backend("gen", url, "generic"))
        code, findings, _ = await doctor(cfg)
    gpus = find(findings, check="gpu")
    assert gpus
    if gpus[0]["facts"].get("nvml") is False:  # no driver here: a warning under `auto`
        assert gpus[0]["severity"] == "warning" and "telemetry: none" in gpus[0]["fix"]
        assert code == 0
    else:  # a machine with a GPU: each card listed
        assert all(f["severity"] == "ok" and "GPU" in f["message"] for f in gpus)


async def test_ollama_settings_read_from_the_process_that_serves_them(clean_env: Path) -> None:
    port = free_port()
    env = child_env(OLLAMA_KEEP_ALIVE="0", OLLAMA_MAX_LOADED_MODELS="1")
    argv = [sys.executable, str(TESTS / "emulated_process.py"), "ollama", "--port", str(port)]
    async with await anyio.open_process(argv, env=env, stderr=None) as proc:
        try:
            assert proc.stdout is not None
            with anyio.fail_after(20):
                line = b""
                while not line.endswith(b"\n"):
                    line += await proc.stdout.receive()
            assert line.decode().strip() == f"http://127.0.0.1:{port}"
            cfg = write(clean_env / "gpubroker.yaml", "telemetry: none\npolicy: budget\n",
                        backend("ollama", f"http://127.0.0.1:{port}", "ollama"))  # fmt: skip
            code, findings, _ = await doctor(cfg)
        finally:
            proc.terminate()
            with anyio.fail_after(10):
                await proc.wait()
    assert code == 0  # warnings only
    from_env = find(findings, check="ollama", backend="ollama", severity="warning")
    assert len(from_env) == 2
    assert all(f["facts"]["source"].startswith(f"pid {proc.pid}") for f in from_env)
    assert from_env[0]["facts"]["keepAlive"] == 0 and from_env[0]["facts"]["maxLoadedModels"] == 1


async def test_ports_held_by_a_running_gpubroker_are_fine(clean_env: Path) -> None:
    """The real `gpubroker serve` and `gpubroker doctor` processes, one config."""
    generic = GenericEmulator(SimGPU(8 * GiB), GiB)
    async with running(generic.app) as url:
        status = free_port()
        cfg = clean_env / "gpubroker.yaml"
        cfg.write_text(
            f"statusPort: {status}\ntelemetry: none\nbackends:\n"
            f"  - {{{backend('gen', url, 'generic')}}}\n"
        )
        env = child_env()
        argv = [str(EXE), "serve", "-c", str(cfg)]
        async with await anyio.open_process(argv, env=env, stderr=subprocess.DEVNULL) as serve:
            try:
                async with httpx.AsyncClient(trust_env=False) as client:
                    with anyio.fail_after(20):
                        while True:
                            try:
                                await client.get(f"http://127.0.0.1:{status}/health")
                                break
                            except httpx.ConnectError:
                                await anyio.sleep(0.05)
                argv = [str(EXE), "doctor", "-c", str(cfg), "--json"]
                done = await anyio.run_process(argv, env=env, check=False)
            finally:
                serve.terminate()
                with anyio.fail_after(20):
                    await serve.wait()
    assert done.returncode == 0, done.stdout
    findings = json.loads(done.stdout)
    held = find(findings, check="ports", severity="info")
    assert len(held) == 2  # the status port and gen's proxy port
    assert all(f["facts"]["gpubroker"] and f["facts"]["pid"] == serve.pid for f in held)
    assert "running gpubroker" in held[0]["message"]


def test_help_lists_doctor() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "doctor" in result.stdout
    result = runner.invoke(app, ["doctor", "--help"])
    assert result.exit_code == 0 and "--json" in result.stdout and "Exit code" in result.stdout


async def test_an_upstream_with_an_endless_body_is_read_only_so_far(clean_env: Path) -> None:
    """A hostile or broken upstream answering its probe with a body that never ends costs the
    doctor a bounded read (never its memory, nor the whole check's time limit)."""
    sent = 0

    async def endless(stream: anyio.abc.SocketStream) -> None:
        nonlocal sent
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\n\r\n")
            chunk = b"<p>" * 21845
            try:
                while True:
                    await stream.send(chunk)
                    sent += len(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, endless)
        cfg = write(
            clean_env / "gpubroker.yaml",
            "telemetry: none\n",
            backend("web", f"http://127.0.0.1:{port}", "generic", unloadEndpoint="/unload"),
        )
        _, findings, _ = await doctor(cfg)
        tg.cancel_scope.cancel()
    web = one(findings, check="upstream", backend="web")
    assert web["severity"] == "ok" and "GET / -> 200" in web["message"], web
    assert sent < 64 * 2**20  # read up to a bound, then the connection closed


async def test_json_stays_strict_when_an_upstream_answers_nan(clean_env: Path) -> None:
    """An upstream answering ``NaN`` where a version belongs (Python's JSON parser takes it,
    strict JSON has no such value) still gets ``--json`` that any JSON parser reads."""

    async def nan(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
            body = b'{"version": NaN}'
            await stream.send(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, nan)
        cfg = write(
            clean_env / "gpubroker.yaml",
            "telemetry: none\n",
            backend("odd", f"http://127.0.0.1:{port}", "ollama"),
        )
        result = await anyio.to_thread.run_sync(
            lambda: runner.invoke(app, ["doctor", "-c", str(cfg), "--json"])
        )
        tg.cancel_scope.cancel()

    def refuse(name: str) -> Any:
        raise ValueError(f"not strict JSON: {name}")

    findings = json.loads(result.stdout, parse_constant=refuse)
    odd = one(findings, check="ollama", backend="odd")
    assert odd["severity"] == "error" and "without a version" in odd["message"]
