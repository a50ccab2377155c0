"""The two loops that keep one engine's state current while it is in the pool.

Health: /ready and /metrics every `scrape_interval_s` give readiness, load, and the engine's own prefix
cache counters (added to the router's, to set against its predictions). A refused connection takes
the engine out until it answers again; a slow answer changes nothing (a busy engine is not a dead one).

Events: /kv/events long-polled with the epoch and number of the last answer applied, so the index holds
exactly the blocks the engine reported; a snapshot answer replaces them. An engine without the endpoint,
without prefix caching or naming blocks by another scheme has no entries, and routing to it falls back to
consistent hashing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from kvpilot.engine.block_hash import HASH_SCHEME
from kvpilot.router.backends import BackendState, EngineLoad, parse_engine_metrics
from kvpilot.router.config import RouterConfig
from kvpilot.router.index import PrefixIndex
from kvpilot.router.metrics import RouterMetrics

log = logging.getLogger(__name__)

_HEALTH_TIMEOUT_S = 5.0
_UNAVAILABLE_RETRY_S = 30.0  # how soon to ask again an engine that publishes no events
_BACKOFF_MAX_S = 5.0


def apply_events(index: PrefixIndex, engine: str, events: list[Any]) -> None:
    """Apply [kind, hash] events in order, a run of one kind at a time."""
    run_kind, run = None, []
    for kind, block_hash in events:
        if kind != run_kind and run:
            (index.stored if run_kind == "stored" else index.evicted)(engine, run)
            run = []
        run_kind = kind
        run.append(int(block_hash))
    if run:
        (index.stored if run_kind == "stored" else index.evicted)(engine, run)


class EngineFeeds:
    def __init__(self, state: BackendState, session: aiohttp.ClientSession, index: PrefixIndex,
                 config: RouterConfig, metrics: RouterMetrics, on_change: Callable[[], None]) -> None:
        self.state = state
        self._session = session
        self._index = index
        self._config = config
        self._metrics = metrics
        self._on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []
        self._counted: EngineLoad | None = None
        self._without_events: str | None = None  # why, once said

    def start(self) -> None:
        name = self.state.name
        self._tasks = [asyncio.create_task(self._health(), name=f"health-{name}"),
                       asyncio.create_task(self._events(), name=f"events-{name}")]

    def stop(self) -> list[asyncio.Task[None]]:
        """Cancel both loops now (neither touches the index again) and return them to be awaited."""
        for task in self._tasks:
            task.cancel()
        return self._tasks

    # ---- health and load ---------------------------------------------------------------------
    async def _health(self) -> None:
        url = self.state.backend.url
        timeout = aiohttp.ClientTimeout(total=_HEALTH_TIMEOUT_S, sock_connect=self._config.connect_timeout_s)
        while True:
            try:
                async with self._session.get(f"{url}/ready", timeout=timeout) as r:
                    ready = r.status == 200
                async with self._session.get(f"{url}/metrics", timeout=timeout) as r:
                    load = parse_engine_metrics(await r.text()) if r.status == 200 else None
                if load is not None:
                    self._count_hits(load)
                    self.state.observe(load)
                self.state.ready, self.state.down_until = ready, 0.0
            except (aiohttp.ConnectionTimeoutError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError,
                    aiohttp.ClientPayloadError) as exc:
                if self.state.ready:
                    log.info("engine %s unreachable: %s", self.state.name, exc)
                self.state.ready = False
            except (TimeoutError, aiohttp.ClientError):
                pass  # slow to answer: busy, not gone
            self._on_change()  # new load figures may give a queued request room
            await asyncio.sleep(self._config.scrape_interval_s)

    def _count_hits(self, load: EngineLoad) -> None:
        """Add the engine's new prefix cache hits and lookups since the last read (a restart starts over)."""
        before = self._counted
        self._counted = load
        if before is None:
            return  # what it counted before this router looked is not this router's doing
        for counter, now, then in ((self._metrics.engine_hits, load.prefix_hits, before.prefix_hits),
                                   (self._metrics.engine_queries, load.prefix_queries, before.prefix_queries)):
            counter.inc(now - then if now >= then else now)

    # ---- prefix block events -----------------------------------------------------------------
    async def _events(self) -> None:
        epoch: str | None = None
        seq, backoff = 0, 0.2
        name, url = self.state.name, self.state.backend.url
        wait = self._config.events_wait_s
        timeout = aiohttp.ClientTimeout(total=wait + 10.0)
        while True:
            params: dict[str, Any] = {"seq": seq, "wait_s": wait if epoch else 0}
            if epoch:
                params["epoch"] = epoch
            try:
                async with self._session.get(f"{url}/kv/events", params=params, timeout=timeout) as r:
                    if r.status == 404:
                        self._unavailable("it has no /kv/events")
                        await asyncio.sleep(_UNAVAILABLE_RETRY_S)
                        continue
                    r.raise_for_status()
                    body = await r.json()
                if body["hash_scheme"] != HASH_SCHEME or not body["prefix_caching"]:
                    self._unavailable(f"prefix caching {body['prefix_caching']}, hash scheme {body['hash_scheme']}")
                    await asyncio.sleep(_UNAVAILABLE_RETRY_S)
                    epoch = None
                    continue
                if body["reset"]:
                    self._index.reset(name, map(int, body["blocks"]))
                else:
                    apply_events(self._index, name, body["events"])
                epoch, seq, backoff = body["epoch"], int(body["seq"]), 0.2
                self.state.block_size = int(body["block_size"])
                self.state.events_synced = True
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
                if self.state.events_synced:
                    log.info("events of %s interrupted: %s", name, exc)
                self.state.events_synced = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _unavailable(self, why: str) -> None:
        if why != self._without_events:
            log.info("engine %s publishes no prefix events (%s): consistent hashing routes to it", self.state.name,
                     why)
            self._without_events = why
        self.state.events_synced = False
        self.state.block_size = None
        self._index.reset(self.state.name, [])
