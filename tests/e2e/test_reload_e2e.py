"""Reloading a real ``gpubroker serve`` process: ``gpubroker reload`` (its exit codes and what it
prints), SIGHUP, and ``--watch-config``, with a stream in flight through it all."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from typer.testing import CliRunner

from gpubroker.cli.main import app
from gpubroker.sim import GenericEmulator, GiB, SimGPU, running
from processes import free_port, port_open

pytestmark = pytest.mark.anyio
runner = CliRunner()
EXE = Path(sys.executable).with_name("gpubroker")


def text(status: int, backends: list[tuple[str, int, str]]) -> str:
    out = f"statusPort: {status}\ntelemetry: none\nshutdownGrace: 10s\nbackends:\n"
    for name, port, upstream in backends:
        out += (
            f"  - name: {name}\n    proxyPort: {port}\n    upstream: {upstream}\n"
            "    unloadStrategy: generic\n"
        )
    return out


async def cli(*args: str) -> Any:
    return await anyio.to_thread.run_sync(lambda: runner.invoke(app, list(args)))


async def holds(value: bool) -> bool:
    return value


async def wait_for(check: Any, limit: float = 15.0) -> None:
    with anyio.fail_after(limit):
        while not await check():
            await anyio.sleep(0.05)


async def test_reload_sighup_and_watch_config_on_a_real_serve(tmp_path: Path) -> None:
    gpu = SimGPU(24 * GiB)
    a_emu = GenericEmulator(gpu, 2 * GiB, token_interval=0.02, owner="a")
    b_emu = GenericEmulator(gpu, 2 * GiB, owner="b")
    c_emu = GenericEmulator(gpu, 2 * GiB, owner="c")
    async with running(a_emu.app) as a, running(b_emu.app) as b, running(c_emu.app) as c:
        status, pa, pb, pc = free_port(), free_port(), free_port(), free_port()
        cfg = tmp_path / "gpubroker.yaml"
        cfg.write_text(text(status, [("a", pa, a)]))
        base = f"http://127.0.0.1:{status}"
        env = {**os.environ, "GPUBROKER_DISABLE_PLUGINS": ""}
        argv = [str(EXE), "serve", "-c", str(cfg), "--watch-config"]
        async with await anyio.open_process(argv, env=env) as proc:
            try:
                async with httpx.AsyncClient(timeout=30) as client:

                    async def up() -> bool:
                        try:
                            return (await client.get(base + "/health")).status_code == 200
                        except httpx.ConnectError:
                            return False

                    await wait_for(up)
                    async with anyio.create_task_group() as tg:
                        lines: list[str] = []

                        async def stream() -> None:
                            body = {"format": "sse", "tokens": 150}
                            url = f"http://127.0.0.1:{pa}/generate"
                            async with client.stream("POST", url, json=body) as r:
                                async for line in r.aiter_lines():
                                    if line:
                                        lines.append(line)

                        tg.start_soon(stream)
                        await wait_for(lambda: holds(a_emu.inflight > 0))

                        # gpubroker reload: b added, what changed printed, exit 0
                        cfg.write_text(text(status, [("a", pa, a), ("b", pb, b)]))
                        done = await cli("reload", "--url", base)
                        assert done.exit_code == 0, done.output
                        assert "reloaded: added b" in done.output
                        assert a_emu.inflight == 1  # the stream goes on across the reload
                        answer = await client.post(f"http://127.0.0.1:{pb}/generate", json={})
                        assert answer.status_code == 200

                        # a broken file: exit 2, file:line:col as `serve --check` prints it
                        cfg.write_text(text(status, [("a", pa, a)]) + "    priorty: 1\n")
                        broken = await cli("reload", "-c", str(cfg), "--json")  # by its port
                        assert broken.exit_code == 2, broken.output
                        assert '"ok": false' in broken.output  # the broker's answer
                        check = await cli("serve", "--check", "-c", str(cfg))
                        assert check.exit_code == 2
                        where = f"{cfg}:9:5: backends[0].priorty: unknown key"
                        assert where in broken.output and where in check.output
                        assert port_open(pb)  # nothing changed

                        # SIGHUP: c added (the watcher may see the edit first: either applies)
                        both = [("a", pa, a), ("b", pb, b), ("c", pc, c)]
                        cfg.write_text(text(status, both))
                        proc.send_signal(signal.SIGHUP)

                        async def c_serves() -> bool:
                            try:
                                url = f"http://127.0.0.1:{pc}/generate"
                                return (await client.post(url, json={})).status_code == 200
                            except httpx.ConnectError:
                                return False

                        await wait_for(c_serves)

                        # --watch-config alone: b removed, its port closes
                        cfg.write_text(text(status, [("a", pa, a), ("c", pc, c)]))
                        await wait_for(lambda: holds(not port_open(pb)))
                        same = await cli("reload", "--url", base, "--json")
                        assert same.exit_code == 0
                        assert json.loads(same.output)["summary"] == "nothing changed"
                    assert lines[-1] == "data: [DONE]"
                    assert len([x for x in lines if '"token"' in x]) == 150
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(15):
                    assert await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
        gone = await cli("reload", "--url", base)
        assert gone.exit_code == 3 and "no broker answering" in gone.output
