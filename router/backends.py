"""An engine as the router sees it: where it is, how loaded, whether it takes requests, what its feed says."""

from __future__ import annotations

from dataclasses import dataclass

from kvpilot.router.config import RouterConfig
from kvpilot.router.index import Match
from kvpilot.router.picker import Candidate

# Engine series the router reads (engine/server/metrics.py), summed over their label sets.
_SERIES = {
    "kvpilot:num_requests_running": "running",
    "kvpilot:num_requests_waiting": "waiting",
    "kvpilot:kv_cache_usage_perc": "kv_usage",
    "kvpilot:prefix_cache_hits_total": "prefix_hits",
    "kvpilot:prefix_cache_queries_total": "prefix_queries",
    "kvpilot:num_empty_kv_blocks": "empty_blocks",
}


@dataclass(frozen=True)
class Backend:
    name: str  # the pod's name, or host:port for a static backend
    url: str  # base URL, no trailing slash


@dataclass(frozen=True)
class EngineLoad:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    prefix_hits: float = 0.0
    prefix_queries: float = 0.0
    empty_blocks: float | None = None  # free blocks holding no cached prefix (None: the engine does not say)


def parse_engine_metrics(text: str) -> EngineLoad:
    """The few series the router needs from an engine's Prometheus text. A line scan, not the
    prometheus_client parser: that one parses every histogram bucket, and this runs for every engine twice a
    second in the process that proxies traffic."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("kvpilot:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = _SERIES.get(name)
        if key is not None:
            try:
                values[key] = values.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return EngineLoad(**values)


@dataclass(eq=False)
class BackendState:
    backend: Backend
    in_flight: int = 0  # this router's requests on it now (exact)
    load: EngineLoad | None = None  # the last /metrics read
    others: int = 0  # requests on it that are not this router's, as of that read (other routers' traffic)
    ready: bool = True  # the last /ready answer (optimistic until the first)
    down_until: float = 0.0  # it refused connections: skip it until its next good health check or then
    refused_until: float = 0.0  # it answered 429/503: full or draining, until its Retry-After
    block_size: int | None = None  # from its event feed
    events_synced: bool = False  # its feed is live: its index entries are the engine's own
    pending_blocks: int = 0  # blocks this router's requests will fill there, sent since the last /metrics read

    @property
    def name(self) -> str:
        return self.backend.name

    def available(self, now: float) -> bool:
        return self.ready and now >= self.down_until

    def overloaded(self, config: RouterConfig, now: float) -> bool:
        if now < self.refused_until:
            return True
        load = self.load
        if load is None:
            return False
        return load.waiting >= config.max_waiting_per_engine or (
            load.waiting > 0 and load.kv_usage >= config.max_kv_usage
        )

    def observe(self, load: EngineLoad) -> None:
        """A fresh /metrics read. Its count of this router's own requests is stale the moment it is read (they
        start and finish between reads), so only the rest is kept, beside the exact `in_flight`."""
        self.load = load
        self.pending_blocks = 0
        self.others = max(0, int(load.running + load.waiting) - self.in_flight)

    def current_load(self) -> int:
        return self.in_flight + self.others

    def free_blocks(self) -> int | None:
        """Blocks it can fill without evicting a cached prefix: its empty blocks at the last /metrics read, less
        those this router has sent it work for since. None when the engine does not report them."""
        if self.load is None or self.load.empty_blocks is None:
            return None
        return max(0, int(self.load.empty_blocks) - self.pending_blocks)

    def candidate(self, config: RouterConfig, now: float, match: Match, prompt_blocks: int) -> Candidate:
        """`prompt_blocks`: the prompt's full blocks in its block size."""
        return Candidate(self.name, self.current_load(), self.overloaded(config, now), match, prompt_blocks,
                         self.free_blocks())
