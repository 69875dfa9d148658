"""Real loopback servers for the judge tests.

- `transformers_serve(folder)`: `transformers serve` (a real OpenAI-compatible server) on a free
  loopback port, ready when /health answers; stopped by its pid.
- `RecordingServer`: a stdlib ThreadingHTTPServer on loopback that records every request body
  and the peak number of requests in flight, and answers each POST with the next scripted action:
  an HTTP status (500, 429, ...), a reply text in an OpenAI chat completion, or `forward` (pass
  the request on to an upstream server, e.g. transformers serve, and relay its answer).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`transformers serve FOLDER` on 127.0.0.1; `url` is its /v1 root."""

    def __init__(self, folder: Path, log: Path):
        self.folder, self.log = Path(folder), Path(log)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe), "serve", str(self.folder), "--host", "127.0.0.1", "--port",
               str(self.port), "--dtype", "float32", "--log-level", "warning"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"transformers serve not ready in {timeout} s: "
                           f"{self.log.read_text()[-2000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._fh.close()


def completion(text: str, prompt_tokens: int = 11, completion_tokens: int = 5) -> dict:
    return {"id": "x", "object": "chat.completion", "model": "m", "created": 0,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class RecordingServer:
    """See the module docstring. `route(body)` may pick an action by content; else the
    `script` actions are used in order; then `default`."""

    def __init__(self, default=("reply", '{"helpfulness": 5, "harmlessness": 6}'),
                 upstream: str = "", delay: float = 0.0):
        self.script: list[tuple] = []
        self.route = None  # body -> action or None: content-based answers, checked first
        self.default = default
        self.upstream = upstream.rstrip("/")
        self.delay = delay
        self.bodies: list[dict] = []
        self.exchanges: list[tuple[dict, dict]] = []  # (request, response) of forwarded 200s
        self.statuses: list[int] = []
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def _next(self, body: dict) -> tuple:
        with self.lock:
            self.bodies.append(body)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            routed = self.route(body) if self.route else None
            return routed or (self.script.pop(0) if self.script else self.default)

    def _answer(self, action: tuple, raw: bytes) -> tuple[int, dict, bytes]:
        if action[0] == "status":
            headers = action[2] if len(action) > 2 else {}
            return action[1], headers, json.dumps({"error": f"scripted {action[1]}"}).encode()
        if action[0] == "reply":
            return 200, {}, json.dumps(completion(action[1])).encode()
        req = urllib.request.Request(self.upstream + "/chat/completions", data=raw,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                payload = resp.read()
            with self.lock:
                self.exchanges.append((json.loads(raw), json.loads(payload)))
            return 200, {}, payload
        except urllib.error.HTTPError as err:
            return err.code, {}, err.read()
        except (urllib.error.URLError, OSError):  # upstream gone: what a dead gateway says
            return 502, {}, b'{"error": "upstream unreachable"}'

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                action = server._next(json.loads(raw))
                status, headers, payload = 500, {}, b"{}"
                try:
                    time.sleep(server.delay)
                    status, headers, payload = server._answer(action, raw)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                        server.statuses.append(status)
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
