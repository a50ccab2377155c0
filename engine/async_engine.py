"""The asyncio front of the engine core, for the HTTP server.

One background task owns the core. Between steps it applies queued submissions and aborts; each
step runs in a worker thread so the event loop keeps serving HTTP while the model computes.
Outputs are fanned out to one asyncio queue per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kvpilot.engine.config import EngineConfig, SamplingParams
from kvpilot.engine.engine_core import EngineCore, EngineStats
from kvpilot.engine.errors import EngineDead, EngineOverloaded
from kvpilot.engine.input_processor import InputProcessor
from kvpilot.engine.outputs import RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


class RequestStream:
    """Iterate a request's cumulative outputs; the last one has `finished` set."""

    def __init__(self, request_id: str, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            if not self.finished:  # the consumer went away (client disconnect): free the request now
                await self._engine.abort(self.request_id)

    async def abort(self) -> None:
        await self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, config: EngineConfig, max_waiting_requests: int = 256) -> None:
        self.core = EngineCore(config)
        self.config = self.core.config
        self.tokenizer: Any = self.core.tokenizer
        self.model_revision = config.revision
        self.max_waiting_requests = max_waiting_requests
        self._streams: dict[str, RequestStream] = {}
        self._pending = 0  # submissions waiting for the step in progress to end
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpilot-step")
        self._input_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvpilot-input")
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="kvpilot-engine-loop")

    def stats(self) -> EngineStats:
        return self.core.stats()

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        self._check_accepting()
        # Tokenizing and validating can take seconds for a huge prompt: off the event loop, outside the lock.
        token_ids = await self.run_input(self.core.inputs.process, prompt, params)
        return await self.add_processed(token_ids, params, request_id, prompt if isinstance(prompt, str) else None)

    async def add_processed(
        self, token_ids: list[int], params: SamplingParams, request_id: str | None = None,
        prompt_text: str | None = None,
    ) -> RequestStream:
        """Admit token ids that `self.inputs` already processed (the server renders chat off the loop)."""
        self._check_accepting()
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(request_id, self)
        arrival = time.monotonic()
        self._pending += 1
        try:
            async with self._lock:  # the core is touched only between steps
                self.core.add_processed(token_ids, params, request_id, arrival, prompt_text)
                self._streams[request_id] = stream
        finally:
            self._pending -= 1
        self._wake.set()
        return stream

    @property
    def inputs(self) -> InputProcessor:
        return self.core.inputs

    async def run_input(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy input work (template rendering, tokenization) on the input threads."""
        return await asyncio.get_running_loop().run_in_executor(self._input_executor, fn, *args)

    def _check_accepting(self) -> None:
        if self._dead is not None or self._task is None or self._task.done():
            raise EngineDead(f"the engine is not running: {self._dead or 'not started'}")
        # Requests queued behind a running step count too, so a burst cannot slip past the bound.
        if self.core.stats().num_waiting + self._pending >= self.max_waiting_requests:
            raise EngineOverloaded(f"the waiting queue is full ({self.max_waiting_requests} requests): retry later")

    async def abort(self, request_id: str) -> None:
        async with self._lock:
            out = self.core.abort(request_id)
            stream = self._streams.pop(request_id, None)
        if stream is not None and out is not None:
            stream.put(out)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.core.has_unfinished:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                async with self._lock:
                    outputs = await loop.run_in_executor(self._executor, self.core.step)
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is None:
                        continue
                    if out.finished:
                        del self._streams[out.request_id]
                    stream.put(out)
                await asyncio.sleep(0)  # let submissions and aborts in between steps
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            log.exception("engine loop failed; failing every open request")
            self._dead = exc
            for stream in self._streams.values():
                stream.put(EngineDead(f"engine failed: {exc}"))
            self._streams.clear()

    async def shutdown(self) -> None:
        """Abort whatever is left (their streams end with finish_reason 'abort') and stop the loop."""
        for request_id in list(self._streams):
            await self.abort(request_id)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)
        self._input_executor.shutdown(wait=False, cancel_futures=True)
        self.core.close()
