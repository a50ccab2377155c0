"""The engines requests may go to now: replaced whole by each discovery update, and the choice among them.

An update swaps the set in one assignment, so between two requests the pool is the old set or the new
one, never a mix (the blue-green switch). An engine that stays keeps its state and feeds; one that
leaves stops its feeds and leaves the index, while requests already on it run to their end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from kvpilot.router.backends import Backend, BackendState
from kvpilot.router.config import RouterConfig
from kvpilot.router.feeds import EngineFeeds
from kvpilot.router.index import Match, PrefixIndex
from kvpilot.router.keys import RouteKey
from kvpilot.router.metrics import BACKEND_STATES, RouterMetrics
from kvpilot.router.picker import Pick, pick


@dataclass(frozen=True)
class Choice:
    state: BackendState
    pick: Pick
    block_hashes: list[int]  # the request's names in the chosen engine's block size


class BackendPool:
    def __init__(self, config: RouterConfig, session: aiohttp.ClientSession, index: PrefixIndex,
                 metrics: RouterMetrics) -> None:
        self._config = config
        self._session = session
        self.index = index
        self._metrics = metrics
        self._states: dict[str, BackendState] = {}
        self._feeds: dict[str, EngineFeeds] = {}
        self._changed = asyncio.Event()
        self._stopping: set[asyncio.Task[None]] = set()
        metrics.watch_backends(self.state_counts)

    @property
    def states(self) -> list[BackendState]:
        return list(self._states.values())

    def update(self, backends: Iterable[Backend]) -> None:
        """Make `backends` the pool, at once."""
        wanted = {b.name: b for b in backends}
        states: dict[str, BackendState] = {}
        for name, backend in wanted.items():
            current = self._states.get(name)
            if current is not None and current.backend == backend:
                states[name] = current
                continue
            if current is not None:
                self._drop(name)
            states[name] = BackendState(backend)
            feeds = self._feeds[name] = EngineFeeds(states[name], self._session, self.index, self._config,
                                                    self._metrics, self.notify)
            feeds.start()
        for name in set(self._states) - set(wanted):
            self._drop(name)
        self._states = states
        self.notify()

    def _drop(self, name: str) -> None:
        feeds = self._feeds.pop(name, None)
        if feeds is not None:
            for task in feeds.stop():
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        self.index.remove(name)

    async def close(self) -> None:
        for name in list(self._feeds):
            self._drop(name)
        self._states = {}
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    def notify(self) -> None:
        """Something changed that may give a waiting request an engine."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    def choose(self, key: RouteKey, avoid: set[str]) -> Choice | None:
        """The engine for `key` among those available, preferring ones not in `avoid` (already tried)."""
        now = time.monotonic()
        available = [s for s in self._states.values() if s.available(now)]
        fresh = [s for s in available if s.name not in avoid]
        return self._choose(key, fresh, now) or (self._choose(key, available, now) if avoid else None)

    def _choose(self, key: RouteKey, states: list[BackendState], now: float) -> Choice | None:
        if not states:
            return None
        config = self._config
        by_size: dict[int, list[BackendState]] = {}
        for s in states:
            by_size.setdefault(s.block_size or config.block_size, []).append(s)
        matches: dict[str, Match] = {}
        for size, group in by_size.items():
            matches.update(self.index.match(key.block_hashes(size), [s.name for s in group], now))
        candidates = [s.candidate(config, now, matches[s.name],
                                  len(key.block_hashes(s.block_size or config.block_size)))
                      for s in states]
        hash_key = key.hash_key(config.block_size, config.hash_prefix_blocks, config.hash_prefix_chars)
        chosen = pick(candidates, hash_key, config.load_factor, config.load_slack, config.eviction_cost)
        if chosen is None:
            return None
        state = next(s for s in states if s.name == chosen.name)
        return Choice(state, chosen, key.block_hashes(state.block_size or config.block_size))

    def state_counts(self) -> dict[str, int]:
        now = time.monotonic()
        counts = dict.fromkeys(BACKEND_STATES, 0)
        for s in self._states.values():
            state = "unavailable" if not s.available(now) else "overloaded" if s.overloaded(self._config, now) \
                else "ready"
            counts[state] += 1
        return counts

    def any_available(self) -> bool:
        now = time.monotonic()
        return any(s.available(now) for s in self._states.values())
