"""Run the real ComfyUI (CPU) behind gpubroker, drive its web UI in headless Chromium, report.

A by-hand check, not a test (pytest does not collect ``scripts/``): the emulator in
``gpubroker.sim.comfyui`` is pinned to what this prints, so rerun it when ComfyUI changes.

It starts, all on 127.0.0.1, each bounded in time and stopped on exit (even on failure):

- ComfyUI from a checkout (``python main.py --cpu``, no CORS flag), with that checkout's python;
- the Ollama emulator (``gpubroker.sim.OllamaEmulator`` on a simulated 24 GiB GPU);
- ``gpubroker serve`` with both as backends (exclusive policy, so a request to one evicts the
  other) from ``--gpubroker-src`` (default: this repository's ``src``).

Then: raw facts straight from ComfyUI (Host/Origin check, ``/system_stats``, ``/queue`` with a
job running and three pending, ``/prompt``, ``/free``, ``/ws`` first message, ``/api/`` twins);
the UI loaded directly and through the broker (responses, 403s, the ``/ws`` socket,
screenshots); a model-free workflow (EmptyImage -> ImageBlur -> SaveImage) dropped onto the
graph and queued with the Run button through the broker; a swap to Ollama and back to ComfyUI
(``X-GPUBroker-Swap`` headers, the status port's ``swaps``). Exit status 1 when the UI does not
load through the broker, 2 when something could not be started.

Prerequisites: a ComfyUI checkout with its requirements installed in a venv (on a machine
without a GPU, torch + torchvision that import together; torchaudio may be missing), Debian's
``chromium``, and the ``playwright`` package in the python that runs this script (no
``playwright install``: the system Chromium is used). The broker python needs gpubroker's
dependencies (this repository's ``.venv``). Example::

    /path/venv/bin/python scripts/real_comfyui.py \\
        --comfyui /path/ComfyUI --comfyui-python /path/venv/bin/python \\
        --broker-python .venv/bin/python --shots /tmp/shots

Environment variables COMFYUI_DIR, COMFYUI_PYTHON, GPUBROKER_PYTHON, CHROMIUM stand in for the
options of the same meaning.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
OLLAMA_MODEL = "llama3.2:1b"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Failed(RuntimeError):
    """Something this script needs could not be started or reached."""


# -- HTTP and WebSocket, stdlib only (this runs in ComfyUI's or any python) --------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")


def request(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request with exactly the headers given (a Host header given replaces the URL's)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or HOST, parts.port or 80, timeout=timeout)
    data = json.dumps(body).encode() if body is not None else None
    hdrs = dict(headers or {})
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.putrequest(method, path, skip_host="Host" in hdrs, skip_accept_encoding=True)
        for k, v in hdrs.items():
            conn.putheader(k, v)
        if data is not None:
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        resp = conn.getresponse()
        return Reply(resp.status, {k: v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.25) -> float:
    """Poll ``check`` (errors count as not yet) until true; seconds taken, Failed on timeout."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        try:
            if check():
                return time.monotonic() - start
        except (OSError, http.client.HTTPException, ValueError) as exc:
            last = f" (last error: {exc})"
        time.sleep(interval)
    raise Failed(f"{what}: not within {timeout:.0f}s{last}")


def ws_first_messages(url: str, count: int = 2, timeout: float = 5.0) -> list[str]:
    """Open a WebSocket with a plain socket and return its first ``count`` text frames."""
    parts = urlsplit(url)
    key = base64.b64encode(os.urandom(16)).decode()
    path = parts.path + ("?" + parts.query if parts.query else "")
    out: list[str] = []
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise Failed(f"{url}: closed during the handshake")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        status_line = head.split(b"\r\n", 1)[0].decode()
        if " 101 " not in status_line + " ":
            return [f"handshake answered {status_line!r}"]

        def need(n: int) -> bytes:
            nonlocal buf
            while len(buf) < n:
                chunk = sock.recv(65536)
                if not chunk:
                    raise Failed(f"{url}: closed mid-frame")
                buf += chunk
            piece, buf = buf[:n], buf[n:]
            return piece

        while len(out) < count:
            b0, b1 = need(2)
            length = b1 & 0x7F
            if length == 126:
                length = int.from_bytes(need(2), "big")
            elif length == 127:
                length = int.from_bytes(need(8), "big")
            payload = need(length)
            opcode = b0 & 0x0F
            if opcode == 1:
                out.append(payload.decode())
            elif opcode == 2:
                out.append(f"<binary frame, {length} bytes>")
            elif opcode == 8:
                out.append("<close>")
                break
    return out


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Procs:
    """Processes this script started, each in its own process group; stopped in reverse."""

    logdir: Path
    started: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], **kw: Any) -> Proc:
        log = self.logdir / f"{name}.log"
        with log.open("wb") as fh:
            popen = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **kw,
            )
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 10.0) -> None:
        if proc.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGTERM)
        try:
            proc.popen.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)
        self.started.clear()


def ensure_free(port: int) -> None:
    with socket.socket() as s:
        if s.connect_ex((HOST, port)) == 0:
            raise Failed(f"port {port} on {HOST} is already in use; pick others with --*-port")


# -- the Ollama emulator, run by the broker's python as a sub-command -------------------------


def serve_ollama_emulator(port: int) -> None:
    """``real_comfyui.py ollama-emulator PORT``: serve the emulator until SIGTERM."""
    import anyio

    from gpubroker.sim import GiB, OllamaEmulator, SimGPU, running

    async def main() -> None:
        emulator = OllamaEmulator(
            SimGPU(24 * GiB, name="Simulated 24 GiB GPU"),
            {OLLAMA_MODEL: 2 * GiB},
            load_seconds=0.5,
            unload_seconds=0.2,
            num_predict=8,
        )
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with running(emulator.app, host=HOST, port=port) as url:
                print(f"Ollama emulator on {url}", flush=True)
                async for _ in signals:
                    return

    anyio.run(main)


# -- the workflows -----------------------------------------------------------------------------


def workflow(width: int = 256, height: int = 256, radius: int = 3, color: int = 0x4080C0) -> dict:
    """EmptyImage -> ImageBlur -> SaveImage in API format (nodes.py, nodes_post_processing.py)."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": 1, "color": color},
        },
        "2": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["1", 0], "blur_radius": radius, "sigma": 2.0},
        },
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": "gpubroker_real"},
        },
    }


def trim(value: Any, limit: int = 400) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def item_layout(item: Any) -> str:
    """One /queue item as its shape: types per position, keys of the dicts."""
    if not isinstance(item, list):
        return type(item).__name__
    parts = []
    for v in item:
        if isinstance(v, dict):
            parts.append("{" + ",".join(list(v)[:6]) + "}")
        elif isinstance(v, list):
            parts.append(f"list{v[:4]}")
        else:
            parts.append(f"{type(v).__name__}({str(v)[:40]})")
    return "[" + ", ".join(parts) + "]"


# -- step 3a: raw facts straight from ComfyUI -------------------------------------------------


def comfy_facts(
    comfy: str, comfy_dir: Path, proxy_port: int, report: Callable[[str], None]
) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    port = urlsplit(comfy).port
    origin = f"http://{HOST}:{proxy_port}"
    r = request("GET", comfy + "/", headers={"Host": f"{HOST}:{port}", "Origin": origin})
    # Origin's port differs from Host's: the origin_only_middleware answers a bare 403.
    facts["host_origin_mismatch"] = {"status": r.status, "headers": r.headers, "body": r.body}
    report(f"Host {HOST}:{port} + Origin {origin} -> {r.status} {r.headers} {r.body!r}")
    r = request("GET", comfy + "/", headers={"Host": f"{HOST}:{port}", "Origin": f"http://{HOST}"})
    report(f"Host {HOST}:{port} + Origin http://{HOST} (no port) -> {r.status}")

    stats = request("GET", comfy + "/system_stats").json()
    facts["system_stats"] = stats
    report("GET /system_stats -> " + json.dumps(stats))
    r = request("GET", comfy + "/prompt")
    report(f"GET /prompt -> {r.status} {r.body.decode()}")
    r = request("POST", comfy + "/free", {"unload_models": True, "free_memory": True})
    report(f"POST /free -> {r.status} headers={r.headers} body={r.body!r}")
    msgs = ws_first_messages(comfy.replace("http", "ws") + "/ws?clientId=real-comfyui-check", 1)
    report("/ws?clientId=... first message: " + trim(msgs, 300))
    msgs = ws_first_messages(comfy.replace("http", "ws") + "/ws", 1)
    report("/ws first message: " + trim(msgs, 300))
    msgs = ws_first_messages(comfy.replace("http", "ws") + "/api/ws", 1)
    report("/api/ws first message: " + trim(msgs, 300))

    # Every GET route without a path parameter, from ComfyUI's own source, with and without /api.
    paths: set[str] = set()
    for src in [comfy_dir / "server.py", *sorted((comfy_dir / "app").rglob("*.py"))]:
        paths |= set(re.findall(r"@routes\.get\([\"'](/[^\"'{]*)[\"']\)", src.read_text()))
    paths.discard("/")
    differ = []
    for path in sorted(paths):
        a = request("GET", comfy + path, timeout=30).status
        b = request("GET", comfy + "/api" + path, timeout=30).status
        if a != b:
            differ.append(f"{path}: {a} vs /api: {b}")
    report(
        f"{len(paths)} GET routes without parameters in server.py/app/: "
        + ("all answer the same under /api/" if not differ else "differ: " + "; ".join(differ))
    )

    # /queue with one job running and three pending: blurs big enough to take seconds on CPU;
    # a different colour each, or ComfyUI's cache would skip the work.
    ids = []
    for i in range(4):
        r = request("POST", comfy + "/prompt", {"prompt": workflow(1536, 1536, 31, 0x102030 + i)})
        ids.append(r.json()["prompt_id"])
    queue: dict[str, Any] = {}

    def three_pending() -> bool:
        nonlocal queue
        queue = request("GET", comfy + "/api/queue").json()
        return len(queue["queue_running"]) == 1 and len(queue["queue_pending"]) >= 3

    try:
        wait_for("a running job and 3 pending", three_pending, 30, 0.05)
        running, pending = queue["queue_running"], queue["queue_pending"]
        report(
            f"GET /api/queue (1 running, {len(pending)} pending): keys {sorted(queue)}; "
            f"running[0] = {item_layout(running[0])}; pending[0] = {item_layout(pending[0])}; "
            f"pending numbers {[p[0] for p in pending]}"
        )
        report("  raw running[0]: " + trim(running[0], 600))
    finally:
        request("POST", comfy + "/queue", {"clear": True})
        request("POST", comfy + "/interrupt", {})
        wait_for(
            "ComfyUI's queue to empty",
            lambda: not any(request("GET", comfy + "/queue").json().values()),
            180,
            0.25,
        )
    hist = request("GET", comfy + f"/history/{ids[0]}").json()
    if hist:
        st = hist[ids[0]]["status"]
        report(f"first job: status {st['status_str']}, messages {[m[0] for m in st['messages']]}")
    return facts


# -- steps 1-2: the web UI in Chromium --------------------------------------------------------


@dataclass
class PageLoad:
    url: str
    statuses: list[tuple[int, str, str]] = field(default_factory=list)
    ws_urls: list[str] = field(default_factory=list)
    ws_frames: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    app_ready: bool = False
    nodes_defined: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def forbidden(self) -> int:
        return sum(1 for s, _, _ in self.statuses if s == 403)

    @property
    def failed(self) -> list[tuple[int, str, str]]:
        """Refusals and errors; a new user's 404s (user.css, no saved workflows) are normal."""
        return [x for x in self.statuses if x[0] == 403 or x[0] >= 500]

    @property
    def missing(self) -> list[tuple[int, str, str]]:
        return [x for x in self.statuses if 400 <= x[0] < 500 and x[0] != 403]

    @property
    def ok(self) -> bool:
        return self.app_ready and bool(self.ws_urls) and not self.failed and not self.error


def open_ui(context: Any, url: str, shot: Path, timeout: float = 90.0) -> tuple[Any, PageLoad]:
    """Load ComfyUI's UI at ``url``; wait for the graph, the Run button and the /ws socket."""
    page = context.new_page()
    load = PageLoad(url)
    page.on("response", lambda r: load.statuses.append((r.status, r.request.method, r.url)))
    page.on(
        "console",
        lambda m: load.console_errors.append(m.text[:200]) if m.type == "error" else None,
    )

    def on_ws(ws: Any) -> None:
        load.ws_urls.append(ws.url)
        ws.on(
            "framereceived", lambda f: load.ws_frames.append(f if isinstance(f, str) else "<bin>")
        )

    page.on("websocket", on_ws)
    start = time.monotonic()
    try:
        page.goto(url, wait_until="load", timeout=timeout * 1000)
        # Poll rather than wait_for_function: a page whose bundle got a 403 never becomes
        # ready, and waiting the full timeout for it teaches nothing.
        deadline = time.monotonic() + timeout
        seen, quiet_since = 0, time.monotonic()
        while not page.evaluate(READY_JS):
            if len(load.statuses) != seen:
                seen, quiet_since = len(load.statuses), time.monotonic()
            if load.failed and time.monotonic() - quiet_since > 10:
                raise Failed(f"not ready, {len(load.failed)} refused, nothing loading for 10s")
            if time.monotonic() > deadline:
                raise Failed(f"not ready within {timeout:.0f}s")
            page.wait_for_timeout(250)
        load.app_ready = True
        load.nodes_defined = page.evaluate(
            "() => Object.keys(window.LiteGraph?.registered_node_types || {}).length"
        )
        deadline = time.monotonic() + 15
        while not load.ws_frames and time.monotonic() < deadline:
            page.wait_for_timeout(100)
    except Exception as exc:  # playwright's TimeoutError and friends: recorded, not raised
        load.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    load.seconds = time.monotonic() - start
    page.wait_for_timeout(500)
    page.screenshot(path=str(shot))
    return page, load


def describe(load: PageLoad, report: Callable[[str], None]) -> None:
    by_status: dict[int, int] = {}
    for s, _, _ in load.statuses:
        by_status[s] = by_status.get(s, 0) + 1
    report(
        f"{load.url}: {len(load.statuses)} responses {dict(sorted(by_status.items()))}, "
        f"403s {load.forbidden}, app ready {load.app_ready} in {load.seconds:.1f}s, "
        f"{load.nodes_defined} node types, ws {load.ws_urls or 'never opened'}"
    )
    for s, m, u in load.failed[:8]:
        report(f"  {s} {m} {u}")
    if load.missing:
        report(
            "  4xx (not 403): " + ", ".join(f"{s} {urlsplit(u).path}" for s, _, u in load.missing)
        )
    if load.ws_frames:
        report("  first ws frame: " + trim(load.ws_frames[0], 300))
    if load.error:
        report("  error: " + load.error)
    for e in load.console_errors[:3]:
        report("  console error: " + e)


READY_JS = """() => !!(window.app && window.app.graph
  && document.querySelector('[data-testid="queue-button"]'))"""

DROP_JS = """async (wf) => {
  const file = new File([JSON.stringify(wf)], "real_comfyui_api.json", {type: "application/json"});
  const dt = new DataTransfer();
  dt.items.add(file);
  const target = document.querySelector("#graph-canvas") || document.body;
  target.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
  for (let i = 0; i < 50 && (window.app.graph._nodes || window.app.graph.nodes).length !== 3; i++)
    await new Promise((r) => setTimeout(r, 100));
  return (window.app.graph._nodes || window.app.graph.nodes).map((n) => n.type);
}"""


def queue_from_ui(page: Any, base: str, wf: dict, report: Callable[[str], None]) -> dict:
    """Drop the API-format workflow onto the canvas, press Run, wait for its history entry."""
    types = page.evaluate(DROP_JS, wf)
    how = "dropped as a file"
    if sorted(types) != sorted(n["class_type"] for n in wf.values()):
        page.evaluate("(wf) => window.app.loadApiJson(wf, 'real_comfyui')", wf)
        types = page.evaluate(
            "() => (window.app.graph._nodes || window.app.graph.nodes).map(n => n.type)"
        )
        how = "loaded with app.loadApiJson (the drop did not take)"
    page.keyboard.press("Escape")
    button = page.locator('[data-testid="queue-button"] button').first
    start = time.monotonic()
    with page.expect_response(
        lambda r: r.request.method == "POST" and urlsplit(r.url).path.endswith("/prompt"),
        timeout=180_000,
    ) as info:
        button.click(timeout=10_000)
    resp = info.value
    posted = time.monotonic() - start
    body = resp.json()
    pid = body.get("prompt_id")
    headers = resp.headers
    entry: dict[str, Any] = {}

    def done() -> bool:
        nonlocal entry
        entry = request("GET", f"{base}/api/history/{pid}").json().get(pid) or {}
        return bool(entry.get("status", {}).get("completed") or entry.get("outputs"))

    wait_for(f"prompt {pid} in history", done, 180, 0.1)
    total = time.monotonic() - start
    images = [i["filename"] for o in entry.get("outputs", {}).values() for i in o.get("images", [])]
    result = {
        "how": how,
        "nodes": types,
        "status": resp.status,
        "post_s": posted,
        "total_s": total,
        "swap": headers.get("x-gpubroker-swap"),
        "queue_ms": headers.get("x-gpubroker-queue-ms"),
        "history": entry.get("status", {}).get("status_str"),
        "images": images,
    }
    report(
        f"queued from the UI ({how}; graph {types}): POST /api/prompt {resp.status} after "
        f"{posted:.2f}s, X-GPUBroker-Swap {result['swap']!r}, queue-ms {result['queue_ms']}; "
        f"history {result['history']} after {total:.2f}s, images {images}"
    )
    return result


# -- main --------------------------------------------------------------------------------------


def broker_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "statusPort": args.status_port,
        "bind": HOST,
        "policy": "exclusive",  # one owner at a time: a request to the other backend swaps
        "unloadTimeout": f"{args.unload_timeout}s",
        "queueTimeout": "120s",
        "holdTime": "1s",
        "gpus": [{"id": 0, "memory": "24GiB"}],
        "backends": [
            {
                "name": "comfyui",
                "proxyPort": args.comfy_proxy_port,
                "upstream": f"http://{HOST}:{args.comfy_port}",
                "unloadStrategy": "comfyui",
                "vram": "12GiB",
                "gpu": 0,
            },
            {
                "name": "ollama",
                "proxyPort": args.ollama_proxy_port,
                "upstream": f"http://{HOST}:{args.ollama_port}",
                "unloadStrategy": "ollama",
                "vram": "9GiB",
                "gpu": 0,
            },
        ],
    }


def git_desc(path: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(path), "describe", "--always", "--dirty", "--tags"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.strip() or "?"


def run(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    from playwright.sync_api import sync_playwright

    comfy_dir = Path(args.comfyui).resolve()
    src = Path(args.gpubroker_src).resolve()
    shots = Path(args.shots)
    shots.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    for port in (args.comfy_port, args.ollama_port, args.comfy_proxy_port):
        ensure_free(port)
    ensure_free(args.ollama_proxy_port)
    ensure_free(args.status_port)

    comfy = f"http://{HOST}:{args.comfy_port}"
    broker = f"http://{HOST}:{args.comfy_proxy_port}"
    status = f"http://{HOST}:{args.status_port}"
    ollama_proxy = f"http://{HOST}:{args.ollama_proxy_port}"
    tmp = Path(tempfile.mkdtemp(prefix="real-comfyui-"))
    procs = Procs(tmp)
    env = dict(os.environ, PYTHONPATH=str(src), NO_PROXY="*", no_proxy="*")
    ui_ok = False
    try:
        frontend = subprocess.run(
            [
                args.comfyui_python,
                "-c",
                "import importlib.metadata as m;print(m.version('comfyui-frontend-package'))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        comfy_proc = procs.start(
            "comfyui",
            [
                args.comfyui_python,
                "main.py",
                "--cpu",
                "--listen",
                HOST,
                "--port",
                str(args.comfy_port),
            ],
            cwd=comfy_dir,
        )
        emu = procs.start(
            "ollama-emulator",
            [args.broker_python, __file__, "ollama-emulator", str(args.ollama_port)],
            env=env,
        )
        cfg = tmp / "gpubroker.yaml"
        cfg.write_text(json.dumps(broker_config(args), indent=2))  # JSON is YAML
        brk = procs.start(
            "gpubroker",
            [args.broker_python, "-m", "gpubroker.cli.main", "serve", "--config", str(cfg), "-v"],
            env=env,
        )
        for proc, url, limit in (
            (emu, f"http://{HOST}:{args.ollama_port}/api/version", 60),
            (brk, status + "/", 60),
            (comfy_proc, comfy + "/system_stats", args.start_timeout),
        ):

            def up(proc: Proc = proc, url: str = url) -> bool:
                if proc.popen.poll() is not None:
                    raise Failed(f"{proc.name} exited {proc.popen.returncode}:\n{proc.tail()}")
                return request("GET", url, timeout=5).status == 200

            took = wait_for(f"{proc.name} to answer {url}", up, limit)
            report(f"{proc.name} up in {took:.1f}s (log {proc.log})")
        stats = request("GET", comfy + "/system_stats").json()
        sysinfo = stats["system"]
        report(
            f"ComfyUI {sysinfo['comfyui_version']} at {git_desc(comfy_dir)}, frontend {frontend}, "
            f"torch {sysinfo['pytorch_version']}, device {stats['devices'][0]['type']}; "
            f"gpubroker from {src} at {git_desc(src)}; playwright {version('playwright')}"
        )

        report("== ComfyUI itself")
        comfy_facts(comfy, comfy_dir, args.comfy_proxy_port, report)
        r = request("GET", broker + "/", headers={"Origin": broker})
        report(
            f"through the broker, Host {HOST}:{args.comfy_proxy_port} + Origin {broker} -> "
            f"{r.status}"
        )

        report("== the UI in headless Chromium")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=args.chromium, args=CHROMIUM_ARGS, timeout=60_000
            )
            report(f"chromium {browser.version}")
            try:
                # A fresh context (no cache, no storage) for each, as a new user's browser.
                ctx = browser.new_context(viewport={"width": 1400, "height": 900})
                page, direct = open_ui(ctx, comfy + "/", shots / "direct.png")
                describe(direct, report)
                ctx.close()
                ctx = browser.new_context(viewport={"width": 1400, "height": 900})
                page, brokered = open_ui(ctx, broker + "/", shots / "broker.png")
                describe(brokered, report)
                ui_ok = brokered.ok
                if not ui_ok:
                    report("the UI did NOT load through the broker")
                    return 1

                report("== a model-free workflow queued from the UI, through the broker")
                first = queue_from_ui(page, broker, workflow(), report)
                page.screenshot(path=str(shots / "broker-after-run.png"))

                report("== swap to Ollama (a generate through its proxy port) and back")
                t0 = time.monotonic()
                r = request(
                    "POST",
                    ollama_proxy + "/api/generate",
                    {"model": OLLAMA_MODEL, "prompt": "hi", "stream": False},
                    timeout=args.unload_timeout + 120,
                )
                report(
                    f"POST /api/generate -> {r.status} in {time.monotonic() - t0:.2f}s, "
                    f"X-GPUBroker-Swap {r.headers.get('x-gpubroker-swap')!r}"
                )
                back = queue_from_ui(page, broker, workflow(color=0x123456), report)
                t0 = time.monotonic()
                r = request("POST", status + "/api/swap", {"backend": "ollama"}, timeout=120)
                report(
                    f"POST {status}/api/swap ollama (gpubroker swap) -> {r.status} in "
                    f"{time.monotonic() - t0:.2f}s: {trim(r.body.decode(), 300)}"
                )
                again = queue_from_ui(page, broker, workflow(color=0x654321), report)
                page.screenshot(path=str(shots / "broker-after-swaps.png"))
            finally:
                browser.close()

        snap = request("GET", status + "/").json()
        report("status port swaps (newest first):")
        for s in snap.get("swaps", []):
            report(
                f"  {s.get('evicted')} -> {s.get('to')}: drain {s.get('drainMs')} ms, "
                f"unload {s.get('unloadMs')} ms, load {s.get('loadMs')} ms, total "
                f"{s.get('totalMs')} ms, failures {s.get('failures')}"
            )
        comfy_unloads = [s for s in snap.get("swaps", []) if "comfyui" in (s.get("evicted") or [])]
        waited = [s for s in comfy_unloads if s.get("unloadMs", 0) >= args.unload_timeout * 900]
        report(
            f"ComfyUI unloads that waited out unloadTimeout ({args.unload_timeout}s): "
            f"{len(waited)} of {len(comfy_unloads)}"
        )
        report(
            f"SUMMARY: UI through broker ok={ui_ok} (403s direct {direct.forbidden}, broker "
            f"{brokered.forbidden}; ws {bool(brokered.ws_urls)}); job {first['total_s']:.2f}s "
            f"{first['history']}; back to ComfyUI {back['total_s']:.2f}s ({back['swap']}), "
            f"again {again['total_s']:.2f}s ({again['swap']})"
        )
        return 0
    except Failed as exc:
        report(f"FAILED: {exc}")
        return 2
    finally:
        for proc in procs.started:
            if proc.popen.poll() is not None and proc.popen.returncode not in (0, None):
                report(f"{proc.name} had exited {proc.popen.returncode}; log tail:\n{proc.tail()}")
        procs.stop_all()
        report(f"stopped everything; logs and config in {tmp}; screenshots in {shots}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "ollama-emulator":
        serve_ollama_emulator(int(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout")
    p.add_argument(
        "--comfyui-python", default=os.environ.get("COMFYUI_PYTHON"), help="its venv's python"
    )
    p.add_argument(
        "--broker-python",
        default=os.environ.get("GPUBROKER_PYTHON", sys.executable),
        help="a python with gpubroker's dependencies",
    )
    p.add_argument("--gpubroker-src", default=str(REPO / "src"), help="gpubroker source to run")
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    p.add_argument("--shots", default="real-comfyui-shots", help="where screenshots go")
    p.add_argument("--comfy-port", type=int, default=8188)
    p.add_argument("--ollama-port", type=int, default=11434)
    p.add_argument("--comfy-proxy-port", type=int, default=5002)
    p.add_argument("--ollama-proxy-port", type=int, default=5001)
    p.add_argument("--status-port", type=int, default=5102)
    p.add_argument("--unload-timeout", type=int, default=10, help="the broker's unloadTimeout")
    p.add_argument("--start-timeout", type=float, default=180, help="seconds for ComfyUI to start")
    args = p.parse_args()
    if not args.comfyui or not args.comfyui_python:
        p.error("--comfyui and --comfyui-python (or COMFYUI_DIR, COMFYUI_PYTHON) are required")
    sys.exit(run(args))


if __name__ == "__main__":
    main()
