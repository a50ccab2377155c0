"""Every PromQL query kvpilot makes, and the one Prometheus client that sends them (prometheus-api-client).

The tuner's load steps, the operator's verification window, its live SLO reading and the re-tuning
attainment all build their queries here, over label selectors whose values are escaped, and read them
through `Prometheus`: TLS verification on (a CA bundle may be given), and errors reduced to what can be
shown in a status condition, never a response body.

Reading one load step's latency and throughput: PromQL through prometheus-api-client, or the engine's /metrics.

A step is a window [start, end] after its warm-up. Counters and histogram buckets are cumulative, so the
window's figures are differences of the values at its two ends (`x - x offset W` in PromQL): exact at
scrape granularity, with none of `rate()`'s extrapolation over a window only a few scrapes long.
Both readers compute quantiles the way `histogram_quantile` does, so their answers agree.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import UTC
from typing import Any, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field

TTFT = "kvpilot:time_to_first_token_seconds"
ITL = "kvpilot:inter_token_latency_seconds"
GENERATION_TOKENS = "kvpilot:generation_tokens_total"

_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class WindowMetrics(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(gt=0)
    output_tokens: float = Field(ge=0)
    ttft_p95_s: float | None = None
    itl_p95_s: float | None = None
    source: str

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def selector(labels: Mapping[str, str]) -> str:
    """`{k="v",...}` with values escaped; label names are checked, since they come from configuration."""
    parts = []
    for k, v in sorted(labels.items()):
        if not _LABEL.match(k):
            raise ValueError(f"{k!r} is not a Prometheus label name")
        escaped = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{k}="{escaped}"')
    return "{" + ",".join(parts) + "}"


def _window(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def quantile_query(histogram: str, labels: Mapping[str, str], seconds: float, q: float = 0.95) -> str:
    """p-quantile of the observations made within the last `seconds`, over every matching pod."""
    sel, w = selector(labels), _window(seconds)
    return f"histogram_quantile({q}, sum by (le) ({histogram}_bucket{sel} - {histogram}_bucket{sel} offset {w}))"


def increase_query(counter: str, labels: Mapping[str, str], seconds: float) -> str:
    sel, w = selector(labels), _window(seconds)
    return f"sum({counter}{sel} - {counter}{sel} offset {w})"


def rate_query(counter: str, labels: Mapping[str, str], window: str = "1m") -> str:
    """The live view (dashboards, re-tuning): a plain rate over a longer window."""
    return f"sum(rate({counter}{selector(labels)}[{window}]))"


def live_quantile_query(histogram: str, labels: Mapping[str, str], window_seconds: float, q: float = 0.95) -> str:
    """The live view of a latency: its p-quantile over the last window, from the buckets' rates."""
    return f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{selector(labels)}[{int(window_seconds)}s])))"


def buckets_query(histogram: str, labels: Mapping[str, str], window: str = "5m") -> str:
    """Each bucket's increase over the last `window`: the live view behind SLO attainment."""
    return f"sum by (le) (increase({histogram}_bucket{selector(labels)}[{window}]))"


def share_within(buckets: Mapping[float, float], target_s: float) -> float | None:
    """Share of observations at or under `target_s`, counted at the largest bucket bound not above it:
    a lower bound, so attainment is never overstated. None when the window holds no observations."""
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return None
    below = [b for b in buckets if b <= target_s]
    return (buckets[max(below)] if below else 0.0) / total


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative bucket counts keyed by upper bound (+Inf included).

    Linear interpolation inside the bucket; the first bucket starts at 0; a quantile landing in the +Inf
    bucket answers the highest finite bound. None when the window holds no observations.
    """
    if not buckets or not 0 <= q <= 1:
        return None
    bounds = sorted(buckets)
    if not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if math.isinf(b):
                return prev_bound if len(bounds) > 1 else None
            if count == prev_count:
                return b
            if b <= 0:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = b, count
    return bounds[-2] if len(bounds) > 1 else None


class Reader(Protocol):
    """Marks the start and end of a window and returns what happened inside it."""

    source: str

    def wait_for_series(self, timeout_s: float = ...) -> None: ...
    def mark(self) -> object: ...
    def window(self, start: object, end: object) -> WindowMetrics: ...


class PrometheusError(Exception):
    """A query that failed, said in a way fit for a status condition: the status code or the kind of failure."""


class Prometheus:
    """The Prometheus HTTP API through prometheus-api-client, with TLS verification on."""

    def __init__(self, url: str, ca_bundle: str | None = None) -> None:
        from prometheus_api_client import PrometheusConnect

        self.url = url
        self._prom = PrometheusConnect(url=url, disable_ssl=False)
        if ca_bundle:
            self._prom._session.verify = ca_bundle

    def vector(self, query: str, at: float | None = None) -> list[dict[str, Any]]:
        from datetime import datetime

        params = {} if at is None else {"time": datetime.fromtimestamp(at, tz=UTC).isoformat()}
        try:
            return list(self._prom.custom_query(query, params=params))
        except Exception as exc:  # prometheus-api-client and requests raise several unrelated types
            code = re.search(r"HTTP Status Code (\d+)", str(exc))
            why = f"HTTP {code.group(1)}" if code else type(exc).__name__
            raise PrometheusError(f"Prometheus query failed: {why}") from None

    def scalar(self, query: str, at: float | None = None) -> float | None:
        """The single value of an instant query; None when there are no samples (or NaN, Inf)."""
        rows = self.vector(query, at)
        if not rows:
            return None
        value = float(rows[0]["value"][1])
        return None if math.isnan(value) or math.isinf(value) else value


class LiveWindow(BaseModel):
    ttft_p95_s: float | None = None
    itl_p95_s: float | None = None
    tokens_per_second: float | None = None


def live_window(prom: Prometheus, labels: Mapping[str, str], window_seconds: float) -> LiveWindow:
    """A live revision's (or a candidate's) TTFT p95, ITL p95 and generation rate over the last window."""
    return LiveWindow(
        ttft_p95_s=prom.scalar(live_quantile_query(TTFT, labels, window_seconds)),
        itl_p95_s=prom.scalar(live_quantile_query(ITL, labels, window_seconds)),
        tokens_per_second=prom.scalar(rate_query(GENERATION_TOKENS, labels, f"{int(window_seconds)}s")),
    )


def attainment(prom: Prometheus, labels: Mapping[str, str], targets_s: Mapping[str, float | None],
               window_seconds: float) -> float | None:
    """Share of requests within every target over the window (the worse of the histograms named in
    `targets_s`, e.g. {TTFT: 0.5}); None when the window holds no requests."""
    shares = []
    for histogram, target_s in targets_s.items():
        if target_s is None:
            continue
        rows = prom.vector(buckets_query(histogram, labels, f"{int(window_seconds)}s"))
        buckets = {float(r["metric"]["le"]): float(r["value"][1]) for r in rows if "le" in r.get("metric", {})}
        share = share_within({b: v for b, v in buckets.items() if not math.isnan(v)}, target_s)
        if share is not None:
            shares.append(share)
    return min(shares, default=None)


class PrometheusReader:
    """PromQL against a real Prometheus, over the series carrying `labels` (e.g. one trial's revision)."""

    source = "prometheus"

    def __init__(self, url: str, labels: Mapping[str, str], scrape_interval_s: float = 1.0,
                 ca_bundle: str | None = None) -> None:
        self.url = url
        self.labels = dict(labels)
        self.scrape_interval_s = scrape_interval_s
        self._prom = Prometheus(url, ca_bundle)

    def mark(self) -> float:
        return time.time()

    def wait_for_series(self, timeout_s: float = 15.0) -> None:
        """Block until Prometheus has scraped this revision once: a window starting before that reads nothing."""
        deadline = time.monotonic() + timeout_s
        query = f"count({GENERATION_TOKENS}{selector(self.labels)})"
        while self._scalar(query, time.time()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Prometheus at {self.url} has no {GENERATION_TOKENS}{selector(self.labels)} "
                                   f"after {timeout_s:.0f} s: does it scrape the engine?")
            time.sleep(self.scrape_interval_s / 2)

    def _scalar(self, query: str, at: float) -> float | None:
        return self._prom.scalar(query, at)

    def window(self, start: object, end: object) -> WindowMetrics:
        t0, t1 = float(start), float(end)  # type: ignore[arg-type]
        if t1 <= t0:
            raise ValueError(f"empty window [{t0}, {t1}]")
        at = t1 + self.scrape_interval_s * 1.1  # the first scrape after the window closes
        time.sleep(max(0.0, at + 0.25 - time.time()))  # ...and give Prometheus a moment to ingest it
        seconds = at - t0
        tokens = self._scalar(increase_query(GENERATION_TOKENS, self.labels, seconds), at)
        return WindowMetrics(
            seconds=t1 - t0, output_tokens=max(0.0, tokens or 0.0), source=f"prometheus {self.url}",
            ttft_p95_s=self._scalar(quantile_query(TTFT, self.labels, seconds), at),
            itl_p95_s=self._scalar(quantile_query(ITL, self.labels, seconds), at),
        )


class Snapshot(BaseModel):
    at: float
    counters: dict[str, float]
    buckets: dict[str, dict[float, float]]


def parse_metrics(text: str, labels: Mapping[str, str]) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """Counter totals and histogram buckets of the series whose labels include `labels`."""
    counters: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if any(s.labels.get(k) != v for k, v in labels.items()):
                continue
            if s.name.endswith("_bucket") and "le" in s.labels:
                b = buckets.setdefault(s.name[: -len("_bucket")], {})
                le = float(s.labels["le"])
                b[le] = b.get(le, 0.0) + s.value
            elif s.name.endswith("_total"):
                counters[s.name] = counters.get(s.name, 0.0) + s.value
    return counters, buckets


class EndpointReader:
    """The fallback when no Prometheus is at hand: the engine's own /metrics, read at both ends of the window."""

    source = "engine /metrics"

    def __init__(self, metrics_url: str, labels: Mapping[str, str]) -> None:
        self.metrics_url = metrics_url
        self.labels = dict(labels)

    def wait_for_series(self, timeout_s: float = 15.0) -> None:
        return None

    def mark(self) -> Snapshot:
        response = httpx.get(self.metrics_url, timeout=10.0)
        response.raise_for_status()
        counters, buckets = parse_metrics(response.text, self.labels)
        return Snapshot(at=time.time(), counters=counters, buckets=buckets)

    def window(self, start: object, end: object) -> WindowMetrics:
        if not isinstance(start, Snapshot) or not isinstance(end, Snapshot):
            raise TypeError("EndpointReader windows are bounded by its own snapshots")

        def quantile(name: str) -> float | None:
            a, b = start.buckets.get(name, {}), end.buckets.get(name, {})
            return histogram_quantile(0.95, {le: b[le] - a.get(le, 0.0) for le in b})

        tokens = end.counters.get(GENERATION_TOKENS, 0.0) - start.counters.get(GENERATION_TOKENS, 0.0)
        return WindowMetrics(seconds=max(1e-6, end.at - start.at), output_tokens=max(0.0, tokens),
                             ttft_p95_s=quantile(TTFT), itl_p95_s=quantile(ITL),
                             source=f"{self.source} {self.metrics_url}")
