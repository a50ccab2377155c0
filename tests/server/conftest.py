"""Servers for the server tests: the real engine on the demo model, served by uvicorn in a thread.

One default server is shared by the whole session; tests that need other settings (queue bound,
API key) start their own through `serve`. Clients talk real HTTP, as production clients do.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from kvpilot.engine.async_engine import AsyncEngine
from kvpilot.engine.config import EngineConfig
from kvpilot.engine.server.app import ServerOptions, build_app
from kvpilot.tuner.prometheus import free_port

SMALL_ENGINE: dict[str, Any] = {
    "model": "demo", "max_model_len": 256, "num_kv_blocks": 160, "max_num_seqs": 16, "device": "cpu",
}


DASHBOARD = Path(__file__).parents[2] / "charts" / "kvpilot" / "dashboards" / "kvpilot.json"


@dataclass
class RunningServer:
    url: str
    engine: AsyncEngine
    app: FastAPI

    def wait_idle(self, timeout_s: float = 15.0) -> None:
        """Every request gone and every KV block back in the pool, or fail naming what is left."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.engine.stats()
            if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"engine not idle after {timeout_s} s: {s}")
            time.sleep(0.02)


def wait_ready(url: str, alive: Callable[[], bool], timeout_s: float) -> None:
    """Poll /ready until it answers 200; fail once the server is gone or the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not alive():
            raise RuntimeError(f"the server at {url} did not become ready")
        time.sleep(0.05)


@contextmanager
def serve(max_waiting_requests: int = 256, options: ServerOptions | None = None, engine_process: bool = True,
          **engine: Any) -> Iterator[RunningServer]:
    """A server on the demo model; the engine core in its own process unless a test must reach into it."""
    eng = AsyncEngine(EngineConfig(**{**SMALL_ENGINE, **engine}), max_waiting_requests=max_waiting_requests,
                      engine_process=engine_process)
    app = build_app(eng, options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, thread.is_alive, 60)
    try:
        yield RunningServer(url, eng, app)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    with serve() as running:
        yield running


async def stream_completion(client: httpx.AsyncClient, max_tokens: int, prompt: list[int]) -> dict[str, object]:
    """One streaming request; returns its status, token count (from logprobs), usage and timing."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "logprobs": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        result: dict[str, object] = {"status": r.status_code, "first_byte_s": time.monotonic() - start,
                                     "retry_after": r.headers.get("retry-after")}
        if r.status_code != 200:
            result["error"] = json.loads(await r.aread())["error"]
            return result
        tokens, usage, done, errors = 0, None, False, []
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                errors.append(chunk["error"])
            for choice in chunk.get("choices", []):
                tokens += len(choice["logprobs"]["tokens"])
            usage = chunk.get("usage") or usage
        result.update(tokens=tokens, usage=usage, done=done, errors=errors)
        return result


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]
