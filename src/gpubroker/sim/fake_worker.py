"""A tiny OpenAI-ish worker *process* with switches for bad behaviour, for the supervisor's tests.

    python -m gpubroker.sim.fake_worker --port 8081 [--ignore-sigterm] [--crash-after N]
        [--start-delay S] [--die-after S] [--child] [--tokens N] [--token-interval S]

It serves ``GET /health``, ``GET /v1/models`` and ``POST /v1/chat/completions`` (SSE when the
body says ``"stream": true``, ending with ``data: [DONE]``) on 127.0.0.1, and logs what it does
to stdout, line by line, as a real model server would. Only the standard library is imported,
so it starts in a few tens of milliseconds.

Switches:

- ``--start-delay S``: "load a model" for S seconds (printing progress) before listening.
- ``--ignore-sigterm``: log SIGTERM and carry on, so only SIGKILL ends it.
- ``--crash-after N``: the N-th chat completion kills the process (exit code 3) halfway through
  its answer; ``0`` crashes at start-up, before listening.
- ``--die-after S``: exit with code 1 S seconds after it started listening (a crash loop).
- ``--child``: start a child process that ignores SIGTERM, to prove a stop reaps the whole tree.

On SIGTERM (unless ignored) it behaves like llama-cpp-python's server: a stream in progress is
cut at once (the connection closes inside the chunked body, no ``data: [DONE]``), and the
process exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CRASH_CODE = 3


def say(message: str) -> None:
    print(message, flush=True)


class State:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lock = threading.Lock()
        self.completions = 0
        self.stopping = threading.Event()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: we log our own lines
        pass

    def _json(self, status: int, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        state = self.server.state
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            model = state.args.model
            self._json(
                200,
                {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "fake"}]},
            )
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "code": 404}})

    def do_POST(self) -> None:
        state = self.server.state
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": {"message": f"no route {self.path}", "code": 404}})
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._json(400, {"error": {"message": "body is not JSON", "code": 400}})
            return
        with state.lock:
            state.completions += 1
            number = state.completions
        crash = state.args.crash_after is not None and number == state.args.crash_after
        tokens = [f"tok{i} " for i in range(state.args.tokens)]
        say(f"request {number}: chat completion, {len(tokens)} tokens, stream={body.get('stream')}")
        if body.get("stream"):
            self._stream(number, tokens, crash)
            return
        for i in range(len(tokens)):
            if crash and i == len(tokens) // 2:
                self._crash(number)
            time.sleep(state.args.token_interval)
        message = {"role": "assistant", "content": "".join(tokens)}
        self._json(
            200,
            {
                "id": f"chatcmpl-{number}",
                "object": "chat.completion",
                "model": state.args.model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            },
        )

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, number: int, delta: dict[str, str], finish: str | None) -> None:
        chunk = {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion.chunk",
            "model": self.server.state.args.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())

    def _stream(self, number: int, tokens: list[str], crash: bool) -> None:
        state = self.server.state
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self._event(number, {"role": "assistant"}, None)
        for i, token in enumerate(tokens):
            if crash and i == len(tokens) // 2:
                self._crash(number)
            if state.stopping.is_set():  # SIGTERM: as llama-cpp-python (uvicorn) does, close
                say(f"request {number}: stream cut by shutdown")  # mid-body: no [DONE], no
                self.close_connection = True  # terminating chunk
                return
            self._event(number, {"content": token}, None)
            time.sleep(state.args.token_interval)
        self._event(number, {}, "stop")
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _crash(self, number: int) -> None:
        say(f"request {number}: crashing on purpose (--crash-after)")
        os._exit(CRASH_CODE)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: State) -> None:
        self.state = state
        super().__init__(address, Handler)


def _spawn_child() -> subprocess.Popen[bytes]:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", code])
    say(f"child pid {child.pid}")
    return child


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpubroker.sim.fake_worker")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--token-interval", type=float, default=0.02)
    parser.add_argument("--start-delay", type=float, default=0.0)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--crash-after", type=int, default=None)
    parser.add_argument("--die-after", type=float, default=None)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args(argv)
    state = State(args)
    say(
        f"fake worker pid {os.getpid()} starting (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')})"
    )

    def on_term(signum: int, frame: object) -> None:
        if args.ignore_sigterm:
            say("SIGTERM received: ignoring it (--ignore-sigterm)")
            return
        say("SIGTERM received: shutting down")
        state.stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    if args.child:
        _spawn_child()
    if args.crash_after == 0:
        say("fatal: cannot load model (--crash-after 0)")
        return CRASH_CODE
    started = time.monotonic()
    while time.monotonic() - started < args.start_delay:
        if state.stopping.is_set():
            return 0
        done = (time.monotonic() - started) / args.start_delay
        say(f"loading model: {done:.0%}")
        time.sleep(min(0.1, args.start_delay))
    server = Server((args.host, args.port), state)
    say(f"listening on http://{args.host}:{args.port}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        while not state.stopping.wait(0.05):
            if args.die_after is not None and time.monotonic() - started >= args.die_after:
                say("fatal: dying on purpose (--die-after)")
                os._exit(1)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    time.sleep(0.1)  # streams in progress notice the shutdown and cut themselves
    say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
