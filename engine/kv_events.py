"""Store and evict events of named KV blocks: collected in the engine core, numbered on the front for routers.

The KV cache reports each block it names (stored) and each named block it reuses for something else
(evicted) to a `BlockEventBuffer` in the core, which the core loop drains into every step's outputs
(messages.CoreOutputs), so they cross the process boundary in order with the tokens. On the front,
`KVEventLog` numbers them in a bounded buffer. A reader asks for the events after the last number it
applied; one that connects for the first time, comes from another epoch (this engine restarted) or fell
further behind than the buffer reaches gets a snapshot of every block held now instead, and continues
from the snapshot's number. So a reader never applies a gap, and memory stays bounded however slow a
reader is. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Literal

Kind = Literal["stored", "evicted"]
STORED: Kind = "stored"
EVICTED: Kind = "evicted"


@dataclass(frozen=True)
class EventBatch:
    epoch: str
    seq: int  # number of the last event included, or the point the snapshot stands for
    events: list[tuple[Kind, int]]
    snapshot: list[int] | None  # not None: drop what you hold for this engine and hold exactly these


class BlockEventBuffer:
    """The core's `kv_cache.BlockListener`: the events since the last drain, in order (single-threaded)."""

    def __init__(self) -> None:
        self._events: list[tuple[Kind, int]] = []

    def stored(self, block_hash: int) -> None:
        self._events.append((STORED, block_hash))

    def evicted(self, block_hash: int) -> None:
        self._events.append((EVICTED, block_hash))

    def drain(self) -> list[tuple[Kind, int]]:
        events, self._events = self._events, []
        return events


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class KVEventLog:
    """The last `capacity` events, numbered, and the set of blocks held now; thread-safe."""

    def __init__(self, capacity: int = 65536) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.epoch = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._events: deque[tuple[Kind, int]] = deque(maxlen=capacity)
        self._seq = 0  # number of the newest event
        self._held: set[int] = set()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def seq(self) -> int:
        return self._seq

    def stored(self, block_hash: int) -> None:
        self.extend([(STORED, block_hash)])

    def evicted(self, block_hash: int) -> None:
        self.extend([(EVICTED, block_hash)])

    def extend(self, events: list[tuple[Kind, int]]) -> None:
        """Number and keep a step's events, in order, and wake the readers waiting for them."""
        if not events:
            return
        with self._lock:
            for kind, block_hash in events:
                self._seq += 1
                self._events.append((kind, block_hash))
                if kind == STORED:
                    self._held.add(block_hash)
                else:
                    self._held.discard(block_hash)
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that reader's loop has closed
                loop.call_soon_threadsafe(_wake, future)

    def read(self, epoch: str | None, since: int, limit: int) -> EventBatch:
        """Up to `limit` events after `since`, or a snapshot when they cannot be given without a gap."""
        with self._lock:
            oldest = self._seq - len(self._events) + 1  # number of the first buffered event
            if epoch != self.epoch or since > self._seq or since < oldest - 1:
                return EventBatch(self.epoch, self._seq, [], list(self._held))
            start = since - oldest + 1
            events = list(itertools.islice(self._events, start, start + limit))
            return EventBatch(self.epoch, since + len(events), events, None)

    async def wait(self, epoch: str | None, since: int, timeout_s: float) -> None:
        """Return as soon as `read(epoch, since, ...)` has something new, or after `timeout_s`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if epoch != self.epoch or self._seq != since:
                return
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            pass
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove((loop, future))
