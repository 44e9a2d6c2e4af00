"""`gpubroker serve --log-format json|text` as a real process through a real swap: every stderr
line of the JSON log is one object, and the swap's phases are logged with their timings."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from gpubroker.logs import JsonFormatter, request_id
from gpubroker.sim import GenericEmulator, GiB, SimGPU, running
from processes import free_port

pytestmark = pytest.mark.anyio
EXE = Path(sys.executable).with_name("gpubroker")


async def _serve_through_a_swap(tmp_path: Path, *args: str) -> str:
    """Serve two generic backends on one 8 GiB GPU, ask ``a`` then ``b`` (a swap that evicts
    ``a``), stop with SIGTERM; the broker's whole stderr."""
    gpu = SimGPU(8 * GiB)
    a = GenericEmulator(gpu, 5 * GiB, owner="a")
    b = GenericEmulator(gpu, 5 * GiB, owner="b")
    async with running(a.app) as ua, running(b.app) as ub:
        status, pa, pb = free_port(), free_port(), free_port()
        cfg = tmp_path / "gpubroker.yaml"
        cfg.write_text(
            f"statusPort: {status}\ntelemetry: none\nbackends:\n"
            f"  - {{name: a, proxyPort: {pa}, upstream: '{ua}', unloadStrategy: generic,"
            " unloadEndpoint: /unload}\n"
            f"  - {{name: b, proxyPort: {pb}, upstream: '{ub}', unloadStrategy: generic,"
            " unloadEndpoint: /unload}\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "GPUBROKER_LOG_FORMAT"}
        env["GPUBROKER_DISABLE_PLUGINS"] = ""
        argv = [str(EXE), "serve", "-c", str(cfg), *args]
        chunks: list[bytes] = []
        async with await anyio.open_process(argv, env=env) as proc:
            assert proc.stderr is not None

            async def drain() -> None:
                assert proc.stderr is not None
                async for chunk in proc.stderr:
                    chunks.append(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(drain)
                try:
                    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
                        with anyio.fail_after(20):
                            while True:
                                try:
                                    await client.get(f"http://127.0.0.1:{status}/health")
                                    break
                                except httpx.ConnectError:
                                    await anyio.sleep(0.05)
                        for port in (pa, pb):
                            r = await client.post(f"http://127.0.0.1:{port}/generate", json={})
                            assert r.status_code == 200
                    proc.send_signal(signal.SIGTERM)
                    with anyio.fail_after(20):
                        assert await proc.wait() == 0
                finally:
                    if proc.returncode is None:
                        proc.kill()
    assert gpu.oom_count == 0
    return b"".join(chunks).decode()


async def test_json_log_is_one_object_per_line_with_the_swap_phases(tmp_path: Path) -> None:
    stderr = await _serve_through_a_swap(tmp_path, "--log-format", "json")
    records = [json.loads(line) for line in stderr.splitlines()]  # every line, or it fails
    assert records
    for r in records:
        assert {"time", "level", "logger", "event"} <= r.keys()
        assert r["time"].endswith("Z") and "T" in r["time"]  # ISO 8601 UTC
    # serve's own start-up summary is a record too, not a stray line
    assert any(r["logger"] == "gpubroker.stderr" and "config:" in r["event"] for r in records)
    swaps = [r for r in records if r["logger"] == "gpubroker.swap"]
    # the swap to b: started for b freeing a, a's unload timed, b's load, done with its phases
    start = next(r for r in swaps if r["phase"] == "start" and r["backend"] == "b")
    assert start["victims"] == ["a"] and start["level"] == "info"
    swap = start["swap"]
    unload = next(r for r in swaps if r["phase"] == "unload" and r["swap"] == swap)
    assert unload["backend"] == "a" and unload["unit"] == "a"
    assert isinstance(unload["durationMs"], int) and unload["durationMs"] >= 0
    assert unload["error"] is None
    assert any(r["phase"] == "load" and r["swap"] == swap and r["backend"] == "b" for r in swaps)
    done = next(r for r in swaps if r["phase"] == "done" and r["swap"] == swap)
    assert done["backend"] == "b" and done["evicted"] == ["a"]
    for key in ("durationMs", "drainMs", "unloadMs", "loadMs"):
        assert isinstance(done[key], int) and done[key] >= 0
    assert done["durationMs"] >= done["unloadMs"]


async def test_text_log_has_the_same_swap_lines(tmp_path: Path) -> None:
    stderr = await _serve_through_a_swap(tmp_path)  # the default: text
    with pytest.raises(ValueError):
        json.loads(stderr.splitlines()[0])
    assert "gpubroker.swap: swap" in stderr
    assert "freeing a (request)" in stderr
    assert "a unloaded in" in stderr
    assert "done: b ready in" in stderr


def test_json_formatter_fields_extras_request_id_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("gpubroker.test.json")
    log.propagate = False
    log.addHandler(handler)
    try:
        token = request_id.set(42)
        log.warning("a %s", "b", extra={"backend": "x", "duration_ms": 3, "odd": object()})
        request_id.reset(token)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "a b" and first["level"] == "warning"
    assert first["logger"] == "gpubroker.test.json"
    assert first["requestId"] == 42 and first["backend"] == "x" and first["durationMs"] == 3
    assert first["odd"].startswith("<object")  # not JSON: written as its str, never a crash
    assert "requestId" not in second
    assert "RuntimeError: boom" in second["exception"]


def test_an_unknown_log_format_is_a_usage_error() -> None:
    from typer.testing import CliRunner

    from gpubroker.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--log-format", "xml"])
    assert result.exit_code == 2 and "xml" in result.output
    result = CliRunner().invoke(app, ["serve"], env={"GPUBROKER_LOG_FORMAT": "yaml"})
    assert result.exit_code == 2 and "yaml" in result.output


def test_json_formatter_writes_strict_json_for_any_extra() -> None:
    """A value JSON cannot hold as such (NaN, a dict keyed by tuples, a cycle) is written as
    text: the record is one strictly valid JSON line, never lost to a logging error."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("gpubroker.test.json_strict")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    cycle: dict[str, object] = {}
    cycle["self"] = cycle
    try:
        log.info("nan", extra={"ratio": float("nan"), "backend": "x"})
        log.info("tuple keys", extra={"per_gpu": {("gpu", 0): 1}})
        log.info("cycle", extra={"cycle": cycle})
    finally:
        log.removeHandler(handler)

    def strict(text: str) -> object:
        def refuse(name: str) -> object:
            raise ValueError(f"not JSON: {name}")

        return json.loads(text, parse_constant=refuse)

    lines = [strict(line) for line in stream.getvalue().splitlines()]
    assert [r["event"] for r in lines] == ["nan", "tuple keys", "cycle"]  # type: ignore[index]
    assert lines[0]["ratio"] == "nan" and lines[0]["backend"] == "x"  # type: ignore[index]
    assert "gpu" in lines[1]["perGpu"]  # type: ignore[index]
    assert isinstance(lines[2]["cycle"], str)  # type: ignore[index]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_log_call_survives_a_stderr_that_broke(fmt: str) -> None:
    """stderr a pipe whose reader went (``serve ... 2>&1 | head``, a journald restart): a log
    call still returns. In JSON mode the logging error's own report went back through the
    stderr stand-in, round and round, until RecursionError reached whoever logged."""
    import subprocess

    import gpubroker

    script = (
        "import logging, os, sys\n"
        "r, w = os.pipe(); os.close(r); sys.stderr = os.fdopen(w, 'w')\n"
        "from gpubroker.logs import configure\n"
        f"configure(fmt={fmt!r})\n"
        "logging.getLogger('gpubroker.test').warning('hello')\n"
        "print('logged', file=sys.__stdout__, flush=True)\n"
        "os._exit(0)  # the broken stderr is not flushed at exit\n"
    )
    src = str(Path(gpubroker.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "logged" in done.stdout, done.stdout[-2000:]


def test_an_unhandled_exception_is_one_json_record_with_its_traceback() -> None:
    """What would have crashed to stderr as a traceback (the main thread's, another thread's)
    is one error record each in JSON mode, its traceback in ``exception``, not a record per
    line of it."""
    import subprocess

    import gpubroker

    script = (
        "import threading\n"
        "from gpubroker.logs import configure\n"
        "configure(fmt='json')\n"
        "def boom():\n"
        "    raise RuntimeError('a thread died')\n"
        "t = threading.Thread(target=boom); t.start(); t.join()\n"
        "raise ValueError('the main thread died')\n"
    )
    src = str(Path(gpubroker.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert len(records) == 2, records
    thread, main = records
    assert thread["level"] == "error" and "RuntimeError: a thread died" in thread["exception"]
    assert main["level"] == "critical" and "ValueError: the main thread died" in main["exception"]
