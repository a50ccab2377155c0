"""Engine requests as the HTTP layer holds them: admitted, tracked for drain, observed, aborted on exit.

Whatever way a handler ends (finished, client gone, cancelled, error), `TrackedStream.close` runs,
and an unfinished request is aborted in the engine at once so its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvpilot.engine.async_engine import AsyncEngine, RequestStream
from kvpilot.engine.config import SamplingParams
from kvpilot.engine.errors import EngineDead, EngineOverloaded, RequestFailed, RequestRejected
from kvpilot.engine.outputs import RequestOutput
from kvpilot.engine.server import errors
from kvpilot.engine.server.lifecycle import Lifecycle
from kvpilot.engine.server.metrics import RequestObserver, ServerMetrics
from kvpilot.engine.tools.formats import ToolFormat
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


@dataclass(eq=False)
class ServingContext:
    engine: AsyncEngine
    metrics: ServerMetrics
    lifecycle: Lifecycle
    model_name: str
    tool_format: ToolFormat | None = None  # how this model's tool calls are written and read
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _token_texts: dict[int, str] = field(default_factory=dict)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run cleanup outside the (possibly cancelled) caller, keeping a reference until done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = str(self.engine.tokenizer.decode([token_id]))
        return text


class TrackedStream:
    def __init__(
        self, ctx: ServingContext, stream: RequestStream, request_id: str, observer: RequestObserver
    ) -> None:
        self.ctx = ctx
        self.request_id = request_id
        self._it: AsyncIterator[RequestOutput] = stream.__aiter__()
        self._observer = observer
        self.finished = False
        self._closed = False
        ctx.lifecycle.add(request_id)

    def __aiter__(self) -> TrackedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self._it.__anext__()
        except EngineDead as exc:
            self.ctx.lifecycle.mark_dead(str(exc))
            self.close()
            raise
        if out.error is not None:
            self.finished = True
            self.close()
            raise RequestFailed(self.request_id)
        self._observer.on_output(out)
        if out.finished:
            self.finished = True
            self.close()
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.ctx.lifecycle.remove(self.request_id)
        if not self.finished:
            self._observer.abandoned()
            self.ctx.spawn(self._abort())

    async def _abort(self) -> None:
        with contextlib.suppress(RuntimeError):  # the iterator may be mid-step in a cancelled task
            await self._it.aclose()  # type: ignore[attr-defined]
        await self.ctx.engine.abort(self.request_id)


async def open_streams(
    ctx: ServingContext, prompts: list[str | list[int]], params: SamplingParams, base_id: str
) -> list[TrackedStream]:
    """Admit every prompt or none: a refusal aborts the ones already admitted."""
    opened: list[TrackedStream] = []
    try:
        for i, prompt in enumerate(prompts):
            if ctx.lifecycle.draining:
                ctx.metrics.rejected("draining")
                raise errors.draining()
            request_id = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            try:
                stream = await ctx.engine.add_request(prompt, params, request_id=request_id)
            except (RequestRejected, EngineOverloaded, EngineDead) as exc:
                reason = {RequestRejected: "invalid", EngineOverloaded: "overload"}.get(type(exc), "dead")
                ctx.metrics.rejected(reason)
                if isinstance(exc, EngineDead):
                    ctx.lifecycle.mark_dead(str(exc))
                raise errors.from_engine(exc) from exc
            opened.append(TrackedStream(ctx, stream, request_id, ctx.metrics.observer()))
            if params.structured_outputs is not None:
                ctx.metrics.structured(params.structured_outputs.kind)
    except BaseException:
        for s in opened:
            s.close()
        raise
    return opened


async def merge(streams: list[TrackedStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: TrackedStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (and so aborting its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone


class EventStream(StreamingResponse):
    """SSE whose generator is always closed after the response, even when the client left mid-stream."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._content = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._content.aclose()  # type: ignore[attr-defined]


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")
