"""A real headless Chromium for tests, driven over the DevTools protocol with ``websockets``.

Only what a page test needs: open a URL at a viewport size, read a JavaScript expression until
it holds, click and press keys, the requests and responses the page made, what it logged as an
error, and screenshots (with a PNG reader, so a test can tell a blank one). Chromium is Debian's
``chromium`` package; ``.ci/run`` installs it. Every wait is bounded and the browser is killed
on exit.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import tempfile
import zlib
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
        self.requests: list[str] = []  # every URL the page asked for, as sent
        self.errors: list[str] = []  # console.error, uncaught exceptions, error log entries
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
        elif message.get("method") == "Network.requestWillBeSent":
            self.requests.append(message["params"]["request"]["url"])
        elif message.get("method") == "Runtime.consoleAPICalled":
            p = message["params"]
            if p["type"] in ("error", "assert"):
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
                self.errors.append(f"console.{p['type']}: {text}")
        elif message.get("method") == "Runtime.exceptionThrown":
            d = message["params"]["exceptionDetails"]
            what = d.get("exception", {}).get("description") or d.get("text", "")
            self.errors.append(f"uncaught at {d.get('url', '?')}:{d.get('lineNumber')}: {what}")
        elif message.get("method") == "Log.entryAdded":
            e = message["params"]["entry"]
            if e["level"] == "error":
                self.errors.append(f"log {e['source']}: {e['text']} ({e.get('url', '')})")

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

    async def set_viewport(self, width: int, height: int) -> None:
        """Lay the page out at ``width`` x ``height`` CSS pixels (a phone when narrow)."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=width < 600,
        )

    async def click(self, selector: str) -> bool:
        """Click the first element ``selector`` matches; False when there is none."""
        found = await self.evaluate(
            f"(e => e ? (e.click(), true) : false)(document.querySelector({json.dumps(selector)}))"
        )
        return bool(found)

    async def press(self, key: str) -> None:
        """Press and release ``key`` ("Tab", "Enter") on whatever has the focus."""
        code, text = {"Tab": (9, ""), "Enter": (13, "\r")}[key]
        down = "keyDown" if text else "rawKeyDown"
        common = {"key": key, "code": key, "windowsVirtualKeyCode": code}
        await self.send("Input.dispatchKeyEvent", type=down, text=text, **common)
        await self.send("Input.dispatchKeyEvent", type="keyUp", **common)

    async def screenshot(self, path: Path) -> bytes:
        """Save what the viewport shows as a PNG at ``path``; its bytes."""
        shot = await self.send("Page.captureScreenshot", format="png")
        data = base64.b64decode(shot["data"])
        await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
        await anyio.Path(path).write_bytes(data)
        return data


def png_colours(data: bytes, *, limit: int = 64) -> int:
    """How many distinct pixel values a PNG holds (counting stops at ``limit``).

    A reader of just what Chromium writes (8-bit RGB or RGBA, not interlaced), so a test can
    tell a blank screenshot without an imaging library. Raises ValueError on a broken file.
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, bytearray(), b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"bad CRC in {kind!r}")
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour}")
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(bytes(idat)), width * bpp
    if len(raw) != height * (stride + 1):
        raise ValueError("truncated image data")
    seen: set[bytes] = set()
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        row = bytearray(raw[start + 1 : start + 1 + stride])
        _unfilter(raw[start], row, prev, bpp)
        seen.update(bytes(row[x : x + bpp]) for x in range(0, stride, bpp * 7))  # every 7th
        if len(seen) >= limit:
            break
        prev = row
    return len(seen)


def _unfilter(kind: int, row: bytearray, prev: bytearray, bpp: int) -> None:
    """Undo one row's PNG filter in place (RFC 2083 §6)."""
    if kind == 0:
        return
    if kind == 2:
        row[:] = bytes((a + b) & 0xFF for a, b in zip(row, prev, strict=True))
        return
    for i in range(len(row)):
        left = row[i - bpp] if i >= bpp else 0
        if kind == 1:
            row[i] = (row[i] + left) & 0xFF
        elif kind == 3:
            row[i] = (row[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            up, corner = prev[i], prev[i - bpp] if i >= bpp else 0
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
            row[i] = (row[i] + pred) & 0xFF
        else:
            raise ValueError(f"unknown PNG filter {kind}")


@asynccontextmanager
async def chromium_page(url: str, width: int = 1280, height: int = 800) -> AsyncIterator[Page]:
    """Open ``url`` in a fresh headless Chromium at ``width`` x ``height`` and yield its page
    once navigation started (console errors and requests are recorded from the start)."""
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
            await page.send("Log.enable")
            await page.set_viewport(width, height)
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
