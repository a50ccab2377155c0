"""The FastAPI app: OpenAI routes, probes, metrics, with admission, access control and drain wired in."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from kvpilot.engine.async_engine import AsyncEngine
from kvpilot.engine.config import SamplingParams
from kvpilot.engine.server import errors, kv_events
from kvpilot.engine.server.chat import create_chat_completion
from kvpilot.engine.server.completions import create_completion
from kvpilot.engine.server.errors import APIError
from kvpilot.engine.server.lifecycle import Lifecycle
from kvpilot.engine.server.metrics import ServerMetrics
from kvpilot.engine.server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from kvpilot.engine.server.protocol import ChatCompletionRequest, CompletionRequest, ErrorResponse
from kvpilot.engine.server.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    ModelCard,
    ModelList,
    ProbeStatus,
    VersionInfo,
    now_s,
)
from kvpilot.engine.server.streams import ClientGone, ServingContext
from kvpilot.engine.tools import formats
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}


class ServerOptions(BaseModel):
    api_key: str | None = Field(default=None, min_length=1,
                                description="require `Authorization: Bearer <key>` on /v1/*; empty is an error, "
                                "not 'no auth'")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    drain_timeout_s: float = Field(default=30.0, ge=0.0)
    warmup: bool = Field(default=True, description="run one tiny request before reporting ready")


def _version() -> str:
    try:
        return version("kvpilot")
    except PackageNotFoundError:
        return "unknown"


async def _warm_up(engine: AsyncEngine) -> None:
    """One token through the whole path (first forward, sampler, detokenizer) before readiness."""
    stream = await engine.add_request([0], SamplingParams(max_tokens=1, temperature=0.0), "warmup")
    async for _ in stream:
        pass


def context(app: FastAPI) -> ServingContext:
    ctx: ServingContext = app.state.ctx
    return ctx


async def drain(app: FastAPI, timeout_s: float) -> int:
    """Graceful drain (SIGTERM): returns how many requests had to be aborted at the timeout."""
    ctx = context(app)
    return await ctx.lifecycle.drain(timeout_s, ctx.engine.abort)


def build_app(engine: AsyncEngine, options: ServerOptions | None = None) -> FastAPI:
    options = options or ServerOptions()
    lifecycle = Lifecycle()
    metrics = ServerMetrics(engine.config, engine.model_revision, engine.stats)
    template = getattr(engine.tokenizer, "chat_template", None)
    ctx = ServingContext(engine, metrics, lifecycle, engine.config.name,
                         formats.resolve(engine.config.tool_call_parser, template))

    async def watch_engine() -> None:
        """The engine core died: out of service at once, and out of the process, so Kubernetes restarts it."""
        await engine.dead.wait()
        lifecycle.mark_dead("engine failed")
        on_death = getattr(app.state, "on_engine_death", None)
        if on_death is not None:
            on_death()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        watcher = asyncio.create_task(watch_engine(), name="kvpilot-engine-watch")
        if options.warmup:
            await _warm_up(engine)
        lifecycle.loaded = True
        log.info("ready: serving %s (revision %s; tool calls: %s)", ctx.model_name, engine.model_revision,
                 ctx.tool_format.name if ctx.tool_format else "none (the chat template shows no format)")
        yield
        lifecycle.loaded = False
        watcher.cancel()
        await engine.shutdown()

    app = FastAPI(title="kvpilot", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible completions and chat served by the kvpilot engine.")
    app.state.ctx = ctx
    app.state.options = options
    errors.install(app)
    kv_events.mount(app, engine)
    app.add_middleware(BodyLimitMiddleware, max_bytes=options.max_body_bytes)
    if options.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=options.api_key)  # outermost: refuse before reading

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, __: ClientGone) -> Response:
        return Response(status_code=499)

    def check_model(name: str) -> None:
        if name != ctx.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{ctx.model_name}`",
                           param="model", code="model_not_found", type="not_found_error")

    @app.get("/health", response_model=ProbeStatus, responses={503: {"model": ProbeStatus}})
    async def health() -> JSONResponse:
        """Liveness: fails only when the engine loop has died."""
        if lifecycle.dead_reason is not None:
            return JSONResponse(ProbeStatus(status="dead", detail="engine failed").model_dump(), 503)
        return JSONResponse(ProbeStatus(status="ok").model_dump())

    @app.get("/ready", response_model=ProbeStatus, responses={503: {"model": ProbeStatus}})
    async def ready() -> JSONResponse:
        """Readiness: model loaded and warmed up, not draining, engine alive."""
        if lifecycle.ready:
            return JSONResponse(ProbeStatus(status="ready").model_dump())
        status = "draining" if lifecycle.draining else "dead" if lifecycle.dead_reason else "not_ready"
        return JSONResponse(ProbeStatus(status=status).model_dump(), 503)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version", response_model=VersionInfo)
    async def version_info() -> VersionInfo:
        return VersionInfo(version=_version(), model=ctx.model_name, revision=engine.model_revision)

    def card() -> ModelCard:
        return ModelCard(id=ctx.model_name, created=now_s(), root=engine.config.model,
                         revision=engine.model_revision, max_model_len=engine.config.max_model_len or 0,
                         vocab_size=len(engine.tokenizer) if engine.tokenizer is not None else None)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS)
    async def get_model(model: str) -> ModelCard:
        check_model(model)
        return card()

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        return await create_chat_completion(ctx, body, request)

    return app
