"""A tiny fake OpenAI engine for router tests and the benchmark: answers, refusals and cuts on demand.

`behaviour` decides each generation request's fate: "ok" (a JSON answer, or `events` SSE chunks then
[DONE]), a status code to answer with (429 and 503 carry Retry-After), "cut_before" (the connection
closes before any answer), "cut_head" (an answer's headers, then the connection closes), "cut_after" (a stream
cut after `events` chunks), or "hang". It serves /ready, /metrics (with settable load) and, when `kv`
holds the engine's own event log, /kv/events over it (the test stores and evicts; a new log is a restart).
With `record`, every request is kept.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from kvpilot.engine.block_hash import HASH_SCHEME
from kvpilot.engine.kv_events import KVEventLog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class StubEngine:
    behaviour: str | int = "ok"
    events: int = 3
    event_delay_s: float = 0.0
    ready: bool = True
    running: int = 0
    waiting: int = 0
    empty_blocks: int | None = None  # free blocks holding no cached prefix, as its /metrics report them
    kv: KVEventLog | None = None
    block_size: int = 16
    record: bool = True
    received: list[dict[str, Any]] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> StubEngine:
        app = web.Application()
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/kv/events", self._kv_events)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            error = {"error": {"message": "stub cannot parse the body", "type": "invalid_request_error"}}
            return web.json_response(error, status=400)
        if self.record:
            self.received.append({"path": request.path, "body": body, "headers": dict(request.headers)})
        behaviour = self.behaviour
        if isinstance(behaviour, int):
            headers = {"Retry-After": "1"} if behaviour in (429, 503) else {}
            error = {"error": {"message": f"stub says {behaviour}", "type": "stub", "param": None, "code": None}}
            return web.json_response(error, status=behaviour, headers=headers)
        if behaviour == "cut_before":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if behaviour == "hang":
            await asyncio.Event().wait()
        stream = bool(body.get("stream"))
        if not stream and behaviour != "cut_head":
            return web.json_response({"object": "text_completion", "engine": self.name, "choices": [{"text": "ok"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream" if stream else "application/json"})
        await response.prepare(request)
        if behaviour == "cut_head":
            assert request.transport is not None
            request.transport.abort()
            return response
        for i in range(self.events):
            chunk = {"engine": self.name, "i": i, "choices": [{"text": f"t{i}"}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if self.event_delay_s:
                await asyncio.sleep(self.event_delay_s)
        if behaviour == "cut_after":
            await response.write(b"data: {\"partial")  # half an event: the router must never pass it on
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "demo", "object": "model"}], "engine": self.name})

    async def _ready(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ready" if self.ready else "draining"}, status=200 if self.ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        labels = '{model_name="demo",revision="stub"}'
        text = (f"kvpilot:num_requests_running{labels} {self.running}\n"
                f"kvpilot:num_requests_waiting{labels} {self.waiting}\n"
                f"kvpilot:kv_cache_usage_perc{labels} 0.1\n")
        if self.empty_blocks is not None:
            text += f"kvpilot:num_empty_kv_blocks{labels} {self.empty_blocks}\n"
        return web.Response(text=text)

    async def _kv_events(self, request: web.Request) -> web.Response:
        """As engine/server/kv_events.py answers, over the test's log."""
        log = self.kv
        if log is None:
            raise web.HTTPNotFound()
        epoch, seq = request.query.get("epoch"), int(request.query.get("seq", "0"))
        wait_s = float(request.query.get("wait_s", "0"))
        if wait_s:
            await log.wait(epoch, seq, wait_s)
        batch = log.read(epoch, seq, 10_000)
        return web.json_response({"epoch": batch.epoch, "seq": batch.seq, "reset": batch.snapshot is not None,
                                  "blocks": batch.snapshot or [], "events": batch.events,
                                  "block_size": self.block_size, "hash_scheme": HASH_SCHEME, "prefix_caching": True})
