"""The router's aiohttp application: OpenAI routes proxied, its own probes, metrics and pool view.

/ready is true while the router runs, engines or not: with no engine up the router still holds requests
in its queue (scale from zero, a switch in progress), which it could not if Kubernetes took it out of its
Service. Every error it answers itself is in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from kvpilot.router.admission import Admission
from kvpilot.router.config import RouterConfig
from kvpilot.router.discovery import BackendSource
from kvpilot.router.errors import RouterError, http_error
from kvpilot.router.index import PrefixIndex
from kvpilot.router.metrics import RouterMetrics
from kvpilot.router.pool import BackendPool
from kvpilot.router.proxy import RouterContext, handle
from kvpilot.router.tokenizer import PromptTokenizer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

CONTEXT = web.AppKey("context", RouterContext)
_PROXIED = ("/v1/completions", "/v1/chat/completions", "/v1/models")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers in OpenAI's error shape, and every answer to a proxied route counted by status."""
    try:
        response = await handler(request)
    except RouterError as exc:
        response = exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = http_error(exc.status, exc.reason).response()
    except Exception as exc:
        log.exception("internal error serving %s %s", request.method, request.path)
        response = http_error(500, f"internal router error: {type(exc).__name__}").response()
    if request.path.startswith(_PROXIED):
        request.app[CONTEXT].metrics.requests.labels(str(response.status)).inc()
    return response


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await handle(request.app[CONTEXT], request)


async def _health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _ready(request: web.Request) -> web.Response:
    pool = request.app[CONTEXT].pool
    return web.json_response({"status": "ready", "engines": len(pool.states), "available": pool.any_available()})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[CONTEXT].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _backends(request: web.Request) -> web.Response:
    """The pool as the router sees it: for people and tests, not a stable API."""
    ctx = request.app[CONTEXT]
    now = time.monotonic()
    return web.json_response([
        {"name": s.name, "url": s.backend.url, "available": s.available(now),
         "overloaded": s.overloaded(ctx.config, now), "in_flight": s.in_flight, "load": s.current_load(),
         "events_synced": s.events_synced, "block_size": s.block_size,
         "blocks_held": ctx.pool.index.blocks_held(s.name), "free_blocks": s.free_blocks()}
        for s in ctx.pool.states
    ])


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("engine discovery stopped: the pool stays as it was", exc_info=task.exception())


def build_app(config: RouterConfig, source: BackendSource, tokenizer: PromptTokenizer | None = None) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_openai_errors])
    app.router.add_post("/v1/completions", _proxy)
    app.router.add_post("/v1/chat/completions", _proxy)
    app.router.add_get("/v1/models", _proxy)
    app.router.add_get("/v1/models/{model:.+}", _proxy)
    app.router.add_get("/health", _health)
    app.router.add_get("/ready", _ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/router/backends", _backends)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=10)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        metrics = RouterMetrics()
        pool = BackendPool(config, session, PrefixIndex(), metrics)
        app[CONTEXT] = RouterContext(config, pool, Admission(pool, config, metrics), metrics, session, tokenizer)
        discovery = asyncio.create_task(source.run(pool.update), name="discovery")
        discovery.add_done_callback(_report_end)
        yield
        discovery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await discovery
        await pool.close()
        await session.close()

    app.cleanup_ctx.append(lifecycle)
    return app
