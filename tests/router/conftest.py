"""The router in-process on the test's event loop, in front of stub engines or a source the test drives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from aiohttp import web
from kvpilot.router.app import CONTEXT, build_app
from kvpilot.router.backends import Backend
from kvpilot.router.config import RouterConfig
from kvpilot.router.discovery import Publish, static_backend
from kvpilot.router.proxy import RouterContext

from tests.router.stub import StubEngine, free_port

FAST = {"scrape_interval_s": 0.05, "events_wait_s": 0.5, "queue_timeout_s": 5.0, "connect_timeout_s": 1.0}


class DrivenSource:
    """A discovery source whose sets the test publishes."""

    def __init__(self, backends: list[Backend] | None = None) -> None:
        self._initial = frozenset(backends or [])
        self._publish: Publish | None = None

    async def run(self, publish: Publish) -> None:
        self._publish = publish
        publish(self._initial)
        await asyncio.Event().wait()

    def publish(self, backends: list[Backend]) -> None:
        assert self._publish is not None, "the router has not started its source"
        self._publish(frozenset(backends))


class RunningRouter:
    def __init__(self, url: str, app: web.Application, source: DrivenSource) -> None:
        self.url = url
        self.app = app
        self.source = source

    @property
    def ctx(self) -> RouterContext:
        return self.app[CONTEXT]

    def metric(self, name: str, **labels: str) -> float:
        return self.ctx.metrics.registry.get_sample_value(name, labels or None) or 0.0


@asynccontextmanager
async def router(stubs: list[StubEngine], **settings: Any) -> AsyncIterator[RunningRouter]:
    config = RouterConfig(port=free_port(), **{**FAST, **settings})
    source = DrivenSource([static_backend(s.url) for s in stubs])
    app = build_app(config, source)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", config.port).start()
    try:
        yield RunningRouter(f"http://127.0.0.1:{config.port}", app, source)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def stubs(count: int, **behaviour: Any) -> AsyncIterator[list[StubEngine]]:
    engines = [await StubEngine(**behaviour).start() for _ in range(count)]
    try:
        yield engines
    finally:
        for engine in engines:
            await engine.stop()


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture()
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c
