"""Test doubles around the real operator: a kopf operator thread, a pod double answering completions."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import kopf
from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.main import build_registry
from kvpilot.tuner.prometheus import free_port


class OperatorThread:
    """The real kopf operator in a thread with its own event loop; stop() is a kill between passes."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(
                kopf.operator(
                    registry=build_registry(self.config),
                    clusterwide=True,
                    standalone=True,
                    stop_flag=self.stop_flag,
                )
            )
        except BaseException as exc:  # surfaced by the test through .error
            self.error = exc

    def start(self) -> OperatorThread:
        self.thread.start()
        return self

    async def stop(self) -> None:
        """Joined off the event loop: the emulator on that loop must keep answering while kopf winds down."""
        self.stop_flag.set()
        await asyncio.to_thread(self.thread.join, 20)
        assert not self.thread.is_alive(), "operator did not stop"


class PodDouble:
    """Stands in for engine pods behind a Service: answers POST /<service>/v1/completions.

    `healthy` maps a Service name to whether it answers 200; calls are recorded for assertions.
    """

    def __init__(self) -> None:
        self.healthy: dict[str, bool] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        double = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                service, _, route = self.path.strip("/").partition("/")
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                double.calls.append((service, body))
                if route != "v1/completions" or not double.healthy.get(service, True):
                    self.send_response(503)
                    self.end_headers()
                    return
                payload = json.dumps(
                    {
                        "id": "x",
                        "object": "text_completion",
                        "model": body.get("model"),
                        "choices": [{"index": 0, "text": " world", "finish_reason": "length"}],
                    }
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{{name}}"

    def __enter__(self) -> PodDouble:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakePrometheus:
    """Answers /api/v1/query like Prometheus: `value(query)` decides (one value, or (labels, value) rows);
    here, a value per metric name in the query."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        self.values = values or {}
        self.queries: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer(parse_qs(urlparse(self.path).query).get("query", [""])[0])

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                self._answer(parse_qs(body).get("query", [""])[0])

            def _answer(self, query: str) -> None:
                fake.queries.append(query)
                value = fake.value(query)
                rows = value if isinstance(value, list) else [] if value is None else [({}, value)]
                result = [{"metric": labels, "value": [time.time(), str(v)]} for labels, v in rows]
                payload = {"status": "success", "data": {"resultType": "vector", "result": result}}
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(payload).encode())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def value(self, query: str) -> float | str | list[tuple[dict[str, str], float]] | None:
        return next((v for k, v in self.values.items() if k in query), None)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def eventually(
    check: Callable[[], Any], timeout: float = 15.0, what: str = "condition", detail: Callable[[], str] | None = None
) -> Any:
    """Poll `check` until it returns something truthy; the event loop keeps serving the emulator meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f"\n{detail()}" if detail else ""))
        await asyncio.sleep(0.05)


async def wait_passes(em: Any, name: str, n: int, timeout: float = 30.0) -> int:
    """Wait until the operator has made `n` more reconcile passes over `name` (each reads it fresh);
    returns the passes made: what "nothing happened" is asserted over, instead of a sleep."""
    start = em.passes(name)
    await eventually(lambda: em.passes(name) >= start + n, timeout, f"{n} reconcile passes over {name}")
    return em.passes(name) - start


class OperatorProcess:
    """`kvpilot operator` as its own process, as it runs in a cluster; kill() is SIGKILL, no goodbye."""

    def __init__(self, config: OperatorConfig, log_path: Path) -> None:
        port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "kvpilot",
            "operator",
            f"--resync-seconds={config.resync_seconds}",
            f"--service-url-template={config.service_url_template}",
            f"--liveness=http://127.0.0.1:{port}/healthz",
        ]
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        return self

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await asyncio.to_thread(self.process.wait, 20)
