"""Readiness, liveness and graceful drain: the server's life as Kubernetes probes and SIGTERM see it.

Drain: readiness turns false and new generation requests get 503 at once, requests already
accepted run on until `timeout`, and whatever is left then is aborted in the engine; its handler
sees the abort and answers the client with an explicit error instead of a silently cut stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

_POLL_S = 0.05
_ABORT_GRACE_S = 5.0


class Lifecycle:
    def __init__(self) -> None:
        self.loaded = False  # model loaded and warmed up
        self.draining = False
        self.drain_expired = False  # the drain timeout passed: leftovers were aborted
        self.dead_reason: str | None = None
        self._in_flight: set[str] = set()

    @property
    def ready(self) -> bool:
        return self.loaded and not self.draining and self.dead_reason is None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def add(self, request_id: str) -> None:
        self._in_flight.add(request_id)

    def remove(self, request_id: str) -> None:
        self._in_flight.discard(request_id)

    def mark_dead(self, reason: str) -> None:
        self.dead_reason = reason

    async def _wait_idle(self, deadline: float) -> bool:
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        return not self._in_flight

    async def drain(self, timeout_s: float, abort: Callable[[str], Awaitable[None]]) -> int:
        """Stop taking requests, let accepted ones finish; return how many had to be aborted."""
        self.draining = True
        log.info("draining: %d request(s) in flight, up to %.1f s", len(self._in_flight), timeout_s)
        if await self._wait_idle(time.monotonic() + timeout_s):
            log.info("drained: every accepted request finished")
            return 0
        self.drain_expired = True
        leftovers = sorted(self._in_flight)
        log.warning("drain timeout expired: aborting %d request(s)", len(leftovers))
        for request_id in leftovers:
            await abort(request_id)
        # Let their handlers send the error to the clients before the server closes connections.
        await self._wait_idle(time.monotonic() + _ABORT_GRACE_S)
        return len(leftovers)
