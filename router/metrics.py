"""The router's Prometheus series (prefix `kvpilot:router_`), in a registry of its own.

Demand: `requests_received` counts completion requests as they arrive, whatever becomes of them, and
`queue_depth` + `requests_in_flight` is what the router holds now; both exist with zero engines.
Predicted against actual cache hits: `prefix_predicted_tokens` counts the prompt tokens the router
expected an engine to find cached; `engine_prefix_hit_tokens` adds up the engines' own
`kvpilot:prefix_cache_hits` as the router reads them, over the same engines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvpilot.router.picker import REASONS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_P = "kvpilot:router_"
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
RETRY_REASONS = ("connect", "disconnected", "overloaded", "unavailable")
UPSTREAM_ERRORS = ("connect", "disconnected", "timeout", "overloaded", "unavailable", "stream_cut")
BACKEND_STATES = ("ready", "overloaded", "unavailable")


class _BackendGauge(Collector):
    """Engines by state, read when scraped."""

    def __init__(self, states: Callable[[], dict[str, int]]) -> None:
        self._states = states

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(f"{_P}backends", "engines in the pool, by state", labels=["state"])
        for state, count in self._states().items():
            family.add_metric([state], count)
        yield family


class RouterMetrics:
    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry()
        self.picks = Counter(f"{_P}picks", "engine choices, by reason", ["reason"], registry=reg)
        for reason in REASONS:
            self.picks.labels(reason)
        self.retries = Counter(f"{_P}retries", "requests sent to another engine before the first byte",
                               ["reason"], registry=reg)
        for reason in RETRY_REASONS:
            self.retries.labels(reason)
        self.upstream_errors = Counter(f"{_P}upstream_errors", "failed exchanges with an engine, by kind",
                                       ["kind"], registry=reg)
        for kind in UPSTREAM_ERRORS:
            self.upstream_errors.labels(kind)
        self.requests = Counter(f"{_P}requests", "requests answered, by HTTP status", ["code"], registry=reg)
        self.received = Counter(f"{_P}requests_received", "completion requests received, counted on arrival (those "
                                "refused or still waiting too): the demand the autoscaler reads", registry=reg)
        self.queue_time = Histogram(f"{_P}queue_time_seconds", "arrival to an engine chosen", buckets=QUEUE_BUCKETS,
                                    registry=reg)
        self.first_byte = Histogram(f"{_P}time_to_first_byte_seconds", "arrival to the first byte sent back",
                                    buckets=LATENCY_BUCKETS, registry=reg)
        self.queue_depth = Gauge(f"{_P}queue_depth", "requests waiting for an engine with room", registry=reg)
        self.in_flight = Gauge(f"{_P}requests_in_flight", "requests on an engine now", registry=reg)
        self.prompt_tokens = Counter(f"{_P}prompt_tokens", "prompt tokens of routed requests the router could "
                                     "tokenize", registry=reg)
        self.predicted_tokens = Counter(f"{_P}prefix_predicted_tokens", "prompt tokens the chosen engine was "
                                        "predicted to hold in its prefix cache", registry=reg)
        self.engine_hits = Counter(f"{_P}engine_prefix_hit_tokens", "engines' own prefix cache hits (tokens), "
                                   "as read from their /metrics", registry=reg)
        self.engine_queries = Counter(f"{_P}engine_prefix_query_tokens", "engines' own prefix cache lookups "
                                      "(tokens), as read from their /metrics", registry=reg)

    def watch_backends(self, states: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_BackendGauge(states))
