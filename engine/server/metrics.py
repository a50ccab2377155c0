"""Prometheus metrics named after vLLM's (prefix `kvpilot:`), observed at the request's edges.

Latencies come from the engine's monotonic request timestamps; engine-wide state (running, waiting,
KV usage, prefix cache and preemption counts) is read from `engine.stats()` at scrape time: the engine
core reports it with every step, across the process boundary. Each app owns its registry, so several
servers can live in one process.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from kvpilot.engine.config import EngineConfig
from kvpilot.engine.outputs import RequestOutput
from kvpilot.engine.structured.params import Kind
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvpilot.engine.messages import EngineStats

LABELS = ["model_name", "revision"]
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6,
                0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075,
               0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0,
               15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0)


class EngineStatsCollector(Collector):
    """Engine state read at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], labels: list[str]) -> None:
        self._stats = stats
        self._labels = labels

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        s = self._stats()
        gauges = {
            "num_requests_running": ("requests in the running batch", s.num_running),
            "num_requests_waiting": ("requests waiting to be scheduled", s.num_waiting),
            "kv_cache_usage_perc": ("fraction of KV-cache blocks in use (0..1)", s.kv_cache_usage),
            "num_free_kv_blocks": ("free KV-cache blocks (cached prefixes included)", s.num_free_blocks),
            "num_total_kv_blocks": ("KV-cache blocks in the pool", s.num_total_blocks),
            "num_empty_kv_blocks": ("free KV-cache blocks holding no cached prefix: taken without evicting",
                                    s.num_empty_blocks),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(f"kvpilot:{name}", doc, labels=LABELS)
            g.add_metric(self._labels, float(value))
            yield g
        counters = {
            "prefix_cache_hits": ("prompt tokens found in the prefix cache", s.prefix_cache_hits),
            "prefix_cache_queries": ("prompt tokens looked up in the prefix cache", s.prefix_cache_queries),
            "num_preemptions": ("sequences preempted for recompute", s.num_preemptions),
            "grammar_compiles": ("grammars compiled for constrained requests (cache misses)", s.grammar_compiles),
            "grammar_compile_seconds": ("seconds spent compiling grammars, off the step loop",
                                        s.grammar_compile_seconds),
            "grammar_cache_hits": ("constrained requests whose grammar was compiled already", s.grammar_cache_hits),
            "jump_forward_tokens": ("tokens a grammar forced, appended without a decoding step each",
                                    s.jump_forward_tokens),
        }
        for name, (doc, value) in counters.items():
            c = CounterMetricFamily(f"kvpilot:{name}", doc, labels=LABELS)
            c.add_metric(self._labels, float(value))
            yield c


class ServerMetrics:
    def __init__(self, config: EngineConfig, revision: str, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"model_name": config.name, "revision": revision}
        values = [config.name, revision]
        reg = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"kvpilot:{name}", doc, LABELS, buckets=buckets, registry=reg).labels(*values)

        self.ttft = hist("time_to_first_token_seconds", "arrival to first token", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "time between consecutive output tokens", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "arrival to finish", E2E_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "arrival to first scheduled", E2E_BUCKETS)
        self.prompt_tokens = Counter("kvpilot:prompt_tokens", "prompt tokens of started requests", LABELS,
                                     registry=reg).labels(*values)
        self.generation_tokens = Counter("kvpilot:generation_tokens", "generated tokens", LABELS,
                                         registry=reg).labels(*values)
        self._success = Counter("kvpilot:request_success", "finished requests by finish reason",
                                [*LABELS, "finished_reason"], registry=reg)
        self._rejected = Counter("kvpilot:request_rejected", "requests refused before queueing, by reason",
                                 [*LABELS, "reason"], registry=reg)
        for reason in ("stop", "length", "abort"):  # series exist from the start, so rate() sees the first one
            self._success.labels(*values, reason)
        for reason in ("overload", "draining", "invalid", "dead"):
            self._rejected.labels(*values, reason)
        self._structured = Counter("kvpilot:structured_requests", "requests admitted with a constrained output, "
                                   "by kind", [*LABELS, "kind"], registry=reg)
        for kind in typing.get_args(Kind):
            self._structured.labels(*values, kind)
        info = Info("kvpilot:engine_config", "engine configuration and model revision", registry=reg)
        info.info({**{k: str(v) for k, v in config.model_dump().items()}, **self.labels})
        reg.register(EngineStatsCollector(stats, values))

    def finished(self, reason: str) -> None:
        self._success.labels(self.labels["model_name"], self.labels["revision"], reason).inc()

    def structured(self, kind: str) -> None:
        self._structured.labels(self.labels["model_name"], self.labels["revision"], kind).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self.labels["model_name"], self.labels["revision"], reason).inc()

    def observer(self) -> RequestObserver:
        return RequestObserver(self)


class RequestObserver:
    """Turns one request's stream of cumulative outputs into latency and token observations."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self._started = False
        self._last_token_at: dict[int, float] = {}
        self.done = False

    def on_output(self, out: RequestOutput) -> None:
        mt = out.metrics
        now = mt.last_token_time or time.monotonic()
        if not self._started and mt.first_token_time is not None:
            self._started = True
            self.m.prompt_tokens.inc(len(out.prompt_token_ids))
            self.m.ttft.observe(mt.first_token_time - mt.arrival_time)
            if mt.first_scheduled_time is not None:
                self.m.queue.observe(mt.first_scheduled_time - mt.arrival_time)
        for index, count in enumerate(out.new_token_counts):
            if count <= 0:
                continue
            self.m.generation_tokens.inc(count)
            previous = self._last_token_at.get(index)
            if previous is not None:
                gap = (now - previous) / count
                for _ in range(count):
                    self.m.itl.observe(gap)
            self._last_token_at[index] = now
        if out.finished and not self.done:
            self.done = True
            reasons = [o.finish_reason for o in out.outputs]
            reason = "abort" if "abort" in reasons else (reasons[0] or "abort")
            if reason != "abort":
                self.m.e2e.observe((mt.finished_time or time.monotonic()) - mt.arrival_time)
            self.m.finished(reason)

    def abandoned(self) -> None:
        """The consumer left before the final output: count it as aborted."""
        if not self.done:
            self.done = True
            self.m.finished("abort")
