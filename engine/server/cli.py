"""`kvpilot serve`: the OpenAI-compatible server; engine flags come from EngineConfig (engine/flags.py).

uvicorn's own signal handling would stop the server with streams still open; here SIGTERM (and
SIGINT) start a graceful drain instead, and the server exits 0 once it is done. A second signal
aborts what is left at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

log = logging.getLogger(__name__)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpilot.engine.flags import add_engine_flags

    add_engine_flags(parser.add_argument_group("engine (EngineConfig's knobs, vLLM's names)"))
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-waiting-requests", type=int, default=256,
                   help="bound of the engine's waiting queue; beyond it requests get 429 at once")
    s.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="request body limit (413 above)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM before they are aborted")
    s.add_argument("--api-key", default=os.environ.get("KVPILOT_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on /v1/* (default: $KVPILOT_API_KEY)")
    s.add_argument("--no-warmup", action="store_true", help="report ready without a warm-up request")
    s.add_argument("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_timeout_s = drain_timeout_s
        self._drains: list[asyncio.Task[None]] = []
        self.engine_died = False

    def on_engine_death(self) -> None:
        """No drain: nothing can finish without the engine. Clients already got their error events."""
        log.error("the engine core died: exiting so the pod is restarted")
        self.engine_died = True
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        timeout = self._drain_timeout_s if not self._drains else 0.0
        log.info("%s: draining (timeout %.1f s)", sig.name, timeout)
        self._drains.append(asyncio.get_running_loop().create_task(self._drain(timeout)))

    async def _drain(self, timeout_s: float) -> None:
        from kvpilot.engine.server.app import drain

        aborted = await drain(self._app, timeout_s)
        log.info("drain done (%d aborted): shutting down", aborted)
        self.should_exit = True


def run(args: argparse.Namespace) -> int:
    from kvpilot.engine.async_engine import AsyncEngine
    from kvpilot.engine.config import EngineConfig
    from kvpilot.engine.flags import engine_values
    from kvpilot.engine.server.app import ServerOptions, build_app

    try:
        config = EngineConfig(**engine_values(args))
        options = ServerOptions(api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                                drain_timeout_s=args.drain_timeout, warmup=not args.no_warmup)
    except ValidationError as exc:
        log.error("invalid settings:\n%s", exc)
        return 2
    if args.max_waiting_requests < 1:
        log.error("--max-waiting-requests must be at least 1")
        return 2
    try:
        engine = AsyncEngine(config, max_waiting_requests=args.max_waiting_requests)
    except (ValueError, OSError) as exc:  # no such model directory, unsupported architecture, no CUDA, ...
        log.error("cannot load %s: %s", config.model, exc)
        return 1
    app = build_app(engine, options)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                               timeout_graceful_shutdown=5, lifespan="on")
    server = DrainingServer(uv_config, app, options.drain_timeout_s)
    app.state.on_engine_death = server.on_engine_death
    asyncio.run(server.serve())
    return 1 if server.engine_died else 0
