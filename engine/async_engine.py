"""The asyncio front of the engine, for the HTTP server: input processing, the engine core (in a process of
its own by default), and output processing.

Requests are tokenized and validated on input threads, then sent to the core by a sender thread, so the event
loop never blocks on a pipe. A reader thread hands each step's outputs to the loop, where they are
detokenized and fanned out to one asyncio queue per request. If the core dies, every open request fails,
`dead` is set, and the server takes itself out of service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kvpilot.engine.config import EngineConfig, SamplingParams
from kvpilot.engine.core_client import CoreClient, start_core
from kvpilot.engine.core_loop import ABORT, ADD, DEAD, FINISH, OUTPUTS, ChannelClosed
from kvpilot.engine.errors import EngineDead, EngineOverloaded, RequestRejected
from kvpilot.engine.input_processor import InputProcessor
from kvpilot.engine.kv_events import KVEventLog
from kvpilot.engine.messages import CoreOutputs, EngineRequest, EngineStats
from kvpilot.engine.model_info import eos_token_ids, load_tokenizer, resolve
from kvpilot.engine.output_processor import OutputProcessor
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
                item = self._latest(await self._queue.get())
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            if not self.finished:  # the consumer went away (client disconnect): free the request now
                await self._engine.abort(self.request_id)

    def _latest(self, item: RequestOutput | BaseException) -> RequestOutput | BaseException:
        """A consumer that fell behind takes every queued output at once: they are cumulative, so the newest
        one with the token counts summed says it all, and the client gets one event (one write) for them."""
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            newer = self._queue.get_nowait()
            if isinstance(newer, RequestOutput):
                newer.new_token_counts = [a + b for a, b in zip(item.new_token_counts, newer.new_token_counts,
                                                                 strict=True)]
            item = newer
        return item

    async def abort(self) -> None:
        await self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, config: EngineConfig, max_waiting_requests: int = 256, engine_process: bool = True) -> None:
        info = resolve(config)
        self.config = info.config
        self.model_revision = config.revision
        self.max_waiting_requests = max_waiting_requests
        self.tokenizer: Any = load_tokenizer(info.model_dir)
        self.client: CoreClient = start_core(self.config, eos_token_ids(info, self.tokenizer),
                                             in_process=not engine_process)
        self.inputs = InputProcessor.for_model(self.tokenizer, info.arch.vocab_size, self.client.info)
        self.outputs = OutputProcessor(self.tokenizer)
        total = self.client.info.num_kv_blocks
        self._stats = EngineStats(num_free_blocks=total, num_total_blocks=total, num_empty_blocks=total)
        self.kv_events = KVEventLog()  # the prefix blocks the core holds, for GET /kv/events
        self._streams: dict[str, RequestStream] = {}
        self._sent = self._received = 0  # "add" messages sent, and taken by the core
        self._processing = 0  # requests in input processing, not yet sent
        self._dead: str | None = None
        self._closing = False
        self.dead = asyncio.Event()
        self._input_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvpilot-input")
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    @property
    def core(self) -> Any:
        """The engine core itself, when it runs in this process (tests); None behind a process boundary."""
        return self.client.core

    async def start(self) -> None:
        if self._threads:
            return
        loop = asyncio.get_running_loop()
        self._threads = [threading.Thread(target=self._read, args=(loop,), name="kvpilot-core-reader", daemon=True),
                         threading.Thread(target=self._send, name="kvpilot-core-sender", daemon=True)]
        for t in self._threads:
            t.start()

    def stats(self) -> EngineStats:
        """The engine's state as of its last step (the core reports it with every step)."""
        return self._stats

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # ---- requests ---------------------------------------------------------------------------
    async def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        self._check_accepting()
        self._processing += 1
        try:
            # Tokenizing and validating can take seconds for a huge prompt: off the event loop.
            token_ids = await self.run_input(self.inputs.process, prompt, params)
        finally:
            self._processing -= 1
        return self.add_processed(token_ids, params, request_id, prompt if isinstance(prompt, str) else None)

    def add_processed(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                      prompt_text: str | None = None) -> RequestStream:
        """Admit token ids that `self.inputs` already processed (the server renders chat off the loop)."""
        self._check_accepting()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise RequestRejected(f"request id {request_id!r} is already running", param="request_id")
        arrival = time.monotonic()
        stream = RequestStream(request_id, self)
        self.outputs.add(request_id, prompt_text, token_ids, params, arrival)
        self._streams[request_id] = stream
        self._sent += 1
        self._outbox.put((ADD, EngineRequest(request_id, token_ids, params, arrival).to_wire()))
        return stream

    async def run_input(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU-heavy input work (template rendering, tokenization) on the input threads."""
        return await asyncio.get_running_loop().run_in_executor(self._input_executor, fn, *args)

    def _check_accepting(self) -> None:
        if self._dead is not None or not self._threads or self._closing:
            raise EngineDead("the engine is not running")
        # Requests still in the pipe or in input processing count too, so a burst cannot slip past the bound.
        waiting = self._stats.num_waiting + (self._sent - self._received) + self._processing
        if waiting >= self.max_waiting_requests:
            raise EngineOverloaded(f"the waiting queue is full ({self.max_waiting_requests} requests): retry later")

    async def abort(self, request_id: str) -> None:
        out = self.outputs.abort(request_id)
        stream = self._streams.pop(request_id, None)
        if out is not None:
            self._outbox.put((ABORT, [request_id]))
        if stream is not None and out is not None:
            stream.put(out)

    # ---- the core's side ----------------------------------------------------------------------
    def _send(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                self.client.send(msg)
            except ChannelClosed:
                return  # the reader reports the death

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        reason = "the engine core process exited"
        try:
            while True:
                msg = self.client.recv(None)
                if msg is None:
                    continue
                if msg[0] == OUTPUTS:
                    try:
                        loop.call_soon_threadsafe(self._on_outputs, CoreOutputs.from_wire(msg[1]))
                    except RuntimeError:  # the loop closed at shutdown
                        return
                elif msg[0] == DEAD:
                    reason = msg[1]
                    break
        except ChannelClosed:
            pass
        with contextlib.suppress(RuntimeError):  # the loop may be closed at shutdown
            loop.call_soon_threadsafe(self._on_dead, reason)

    def _on_outputs(self, batch: CoreOutputs) -> None:
        self._stats = batch.stats
        self._received = batch.requests_received
        self.kv_events.extend(batch.block_events)
        outputs, stopped = self.outputs.process(batch)
        if stopped:
            self._outbox.put((FINISH, stopped))
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _on_dead(self, reason: str) -> None:
        if self._closing:
            return
        log.error("engine core died (%s): failing %d open request(s)", reason, len(self._streams))
        self._dead = reason
        for stream in self._streams.values():
            stream.put(EngineDead("engine failed"))
        self._streams.clear()
        self.dead.set()

    async def shutdown(self) -> None:
        """Abort whatever is left (their streams end with finish_reason 'abort') and stop the core."""
        for request_id in list(self._streams):
            await self.abort(request_id)
        self._closing = True
        self._outbox.put(None)  # the sender stops first: one writer on the pipe at a time

        def stop() -> None:
            for t in self._threads:
                if t.name == "kvpilot-core-sender":
                    t.join()
            self.client.close()

        await asyncio.get_running_loop().run_in_executor(None, stop)
        self._input_executor.shutdown(wait=False, cancel_futures=True)
