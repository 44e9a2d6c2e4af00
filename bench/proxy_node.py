"""The bench's Node pieces: the upstream, and the two Node peer brokers (``bench/proxy.py``).

Peer A is OneGPU4All's data path as it ships (github.com/jeanfbrito/onegpu4all, ``src/proxy.mjs``
``createProxyServer`` and ``src/vram-manager.mjs`` ``VRAMManager``, read at 9c9c869): a Node
``http.createServer`` handing every request to one ``http-proxy`` (^1.18.1) server made with
``{target, ws: true, timeout, proxyTimeout}`` and no agent, so http-proxy's ``setupOutgoing``
(``lib/http-proxy/common.js``) sends ``connection: close`` and opens a new upstream connection
per request. A GPU request first awaits ``acquire()`` (an async function: with the owner
unchanged it only counts; the very first one unloads the others and waits a 1 s settle), is
pushed onto a live-request list, logs one line as it starts and one as its response closes
(``console.log``, here to /dev/null), and is released on the response's ``close``; a
passthrough counts itself on ``close``. Which requests are GPU work follows the bench's
broker config (``POST /gpu``, ``POST /v1/chat/completions``, ``GET /gpu-sse``) rather than
OneGPU4All's own rule for an unknown backend (every non-GET), so both brokers lease the
same requests. Peer B is the same with a keep-alive ``http.Agent`` to the upstream, as a tuned
Node (or Go) broker runs. Facts from that source; the code is ours.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

HTTP_PROXY = "http-proxy@1.18.1"
CACHE = Path.home() / ".cache" / "gpubroker-bench" / "node"

NODE_UPSTREAM = r"""
const http = require("http");
const { performance } = require("perf_hooks");
const small = Buffer.from("hello, world\n");
const now = () => (performance.timeOrigin + performance.now()) / 1000;
const server = http.createServer((req, res) => {
  if (req.url.startsWith("/sse") || req.url.startsWith("/gpu-sse")) {
    const q = new URL(req.url, "http://x").searchParams;
    const n = +q.get("n"), interval = +q.get("interval");
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    // Event i is due at start + i * interval, however late the last one was: a GPU-bound
    // token stream does not slow down because the proxy's host is busy.
    const start = performance.now();
    let i = 0, timer;
    const tick = () => {
      if (i++ < n) {
        res.write(`data: {"token":"tok${i}","t":${now()}}\n\n`);
        timer = setTimeout(tick, Math.max(0, start + (i + 1) * interval - performance.now()));
      } else res.end("data: [DONE]\n\n");
    };
    timer = setTimeout(tick, interval);
    res.on("close", () => clearTimeout(timer));
    return;
  }
  req.on("data", () => {});
  req.on("end", () => {
    res.writeHead(200, { "content-type": "text/plain", "content-length": small.length });
    res.end(small);
  });
});
server.keepAliveTimeout = 65000;
server.listen(0, "127.0.0.1", () => console.log(server.address().port));
"""

# argv: http-proxy's path, the upstream URL, "keepalive" or "new"; prints its port on stderr.
NODE_PEER = r"""
const http = require("http");
const httpProxy = require(process.argv[1]);
const target = process.argv[2], keepAlive = process.argv[3] === "keepalive";
const GPU = [["POST", "/gpu"], ["POST", "/v1/chat/completions"], ["GET", "/gpu-sse"]];
const needsGpu = (method, url) => {
  const path = url.split("?")[0];
  return GPU.some(([m, p]) => m === method && path === p);
};
const ts = () => new Date().toISOString().replace("T", " ").slice(0, 19);
const info = (msg) => console.log(`${ts()} INFO [bench] ${msg}`);

// The lease as VRAMManager keeps it for one backend: an owner, counters, a live list.
const vram = { owner: null, swapping: false, active: 0, queue: [], requests: 0, passed: 0,
               live: [] };
async function acquire() {
  vram.requests++;
  if (vram.owner === null && !vram.swapping) {  // first GPU request: free the others, settle
    vram.swapping = true;
    await new Promise((r) => setTimeout(r, 1000));
    vram.owner = "bench"; vram.active++; vram.swapping = false;
    return;
  }
  if (!vram.swapping && vram.owner === "bench") { vram.active++; return; }
  await new Promise((resolve) => vram.queue.push(resolve));  // (one backend: never reached)
  vram.active++;
}
function release() {
  vram.active = Math.max(0, vram.active - 1);
  if (vram.active === 0) while (vram.queue.length) vram.queue.shift()();
}

const options = { target, ws: true, timeout: 300000, proxyTimeout: 300000 };
if (keepAlive) options.agent = new http.Agent({ keepAlive: true, maxSockets: 1024 });
const proxy = httpProxy.createProxyServer(options);
proxy.on("error", (err, req, res) => {
  if (res && res.writeHead) {
    res.writeHead(502, { "Content-Type": "application/json" });
    res.end(JSON.stringify({ error: "Backend unavailable", backend: "bench" }));
  }
});
const server = http.createServer(async (req, res) => {
  const start = Date.now();
  if (needsGpu(req.method, req.url)) {
    try {
      await acquire();
    } catch (err) {
      res.writeHead(503, { "Content-Type": "application/json", "Retry-After": "5" });
      res.end(JSON.stringify({ error: "VRAM swap failed", message: err.message }));
      return;
    }
    const entry = { method: req.method, url: req.url.split("?")[0],
                    startedAt: new Date().toISOString(), backend: "bench" };
    vram.live.push(entry);
    const queued = vram.queue.length;
    info(`-> ${req.method} ${req.url} [GPU] (active: ${vram.active}, queued: ${queued})`);
    let released = false;
    const cleanup = () => {
      if (released) return;
      released = true;
      release();
      const i = vram.live.indexOf(entry);
      if (i !== -1) vram.live.splice(i, 1);
      info(`<- ${req.method} ${req.url} [GPU] (${Date.now() - start}ms)`);
    };
    res.on("close", cleanup);
    res.on("error", cleanup);
  } else {
    res.on("close", () => { vram.passed++; });
  }
  proxy.web(req, res);
});
server.on("upgrade", (req, socket, head) => proxy.ws(req, socket, head));
server.listen(0, "127.0.0.1", () => console.error(server.address().port));
"""


def node() -> str | None:
    return shutil.which("node")


def install_http_proxy() -> Path | None:
    """http-proxy's package directory, installed with npm into the bench's cache once; None
    without node or npm (or when the registry cannot be reached)."""
    package = CACHE / "node_modules" / "http-proxy"
    if (package / "package.json").exists():
        return package
    npm = shutil.which("npm")
    if node() is None or npm is None:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--silent", "--prefix", str(CACHE),
             HTTP_PROXY],
            check=True,
            timeout=300,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return package if (package / "package.json").exists() else None
