"""A real headless Chromium for tests, driven over the DevTools protocol with ``websockets``.

Only what a page test needs: open a URL, read a JavaScript expression until it holds, and the
responses the page received (status per URL). Chromium is Debian's ``chromium`` package;
``.ci/run`` installs it. Every wait is bounded and the browser is killed on exit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class Page:
    """One tab: CDP commands and the network responses it saw."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = 0
        self.responses: list[tuple[int, str]] = []  # (status, url), documents and fetches
        self.websockets: list[tuple[int, str]] = []  # handshake (status, url)
        self._replies: dict[int, Any] = {}

    async def send(self, method: str, **params: Any) -> Any:
        self._ids += 1
        mine = self._ids
        await self._ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        with anyio.fail_after(15):
            while mine not in self._replies:
                self._note(json.loads(await self._ws.recv()))
        reply = self._replies.pop(mine)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _note(self, message: dict[str, Any]) -> None:
        if "id" in message:
            self._replies[message["id"]] = message
        elif message.get("method") == "Network.responseReceived":
            r = message["params"]["response"]
            self.responses.append((int(r["status"]), r["url"]))
        elif message.get("method") == "Network.webSocketHandshakeResponseReceived":
            r = message["params"]["response"]
            self.websockets.append((int(r["status"]), message["params"].get("requestId", "")))

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, within: float = 15.0) -> Any:
        """Evaluate ``expression`` until it is truthy; its last value after ``within`` s."""
        value = None
        with anyio.move_on_after(within):
            while not (value := await self.evaluate(expression)):
                await anyio.sleep(0.05)
        return value


@asynccontextmanager
async def chromium_page(url: str) -> AsyncIterator[Page]:
    """Open ``url`` in a fresh headless Chromium and yield its page once navigation started."""
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="gpubroker-chromium-"))
    proc = await anyio.open_process(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        with anyio.fail_after(20):
            while not port_file.exists() or not port_file.read_text().strip():
                await anyio.sleep(0.05)
        port = port_file.read_text().split()[0]
        with anyio.fail_after(10):
            while True:
                targets = await anyio.to_thread.run_sync(_targets, port)
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    break
                await anyio.sleep(0.05)
        async with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, proxy=None) as ws:
            page = Page(ws)
            await page.send("Network.enable")
            await page.send("Runtime.enable")
            await page.send("Page.navigate", url=url)
            yield page
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            proc.kill()
            await proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _targets(port: str) -> list[dict[str, Any]]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
        return list(json.loads(r.read()))
