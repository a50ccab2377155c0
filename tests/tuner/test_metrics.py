"""PromQL strings, histogram_quantile as Prometheus computes it, and the /metrics fallback reader."""

from __future__ import annotations

import math
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from kvpilot.tuner.metrics import (
    GENERATION_TOKENS,
    ITL,
    TTFT,
    EndpointReader,
    histogram_quantile,
    increase_query,
    parse_metrics,
    quantile_query,
    rate_query,
    selector,
)
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app


def test_selector_escapes_values_and_rejects_bad_names() -> None:
    assert selector({"revision": 'a"b', "model_name": "m"}) == '{model_name="m",revision="a\\"b"}'
    with pytest.raises(ValueError, match="label name"):
        selector({"bad-name": "x"})


def test_queries_difference_cumulative_series_over_the_window() -> None:
    labels = {"revision": "trial-3"}
    assert quantile_query(TTFT, labels, 2.5) == (
        'histogram_quantile(0.95, sum by (le) (kvpilot:time_to_first_token_seconds_bucket{revision="trial-3"} - '
        'kvpilot:time_to_first_token_seconds_bucket{revision="trial-3"} offset 2500ms))')
    assert increase_query(GENERATION_TOKENS, labels, 1) == (
        'sum(kvpilot:generation_tokens_total{revision="trial-3"} - '
        'kvpilot:generation_tokens_total{revision="trial-3"} offset 1000ms)')
    assert rate_query(GENERATION_TOKENS, labels) == 'sum(rate(kvpilot:generation_tokens_total{revision="trial-3"}[1m]))'


def test_histogram_quantile_matches_prometheus_rules() -> None:
    inf = math.inf
    # 100 observations: 50 in (0, 0.1], 40 in (0.1, 0.2], 10 in (0.2, 0.4]
    buckets = {0.1: 50, 0.2: 90, 0.4: 100, inf: 100}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.99, {0.1: 50, inf: 100}) == pytest.approx(0.1)  # in +Inf: the top finite bound
    assert histogram_quantile(0.95, {0.1: 0, inf: 0}) is None
    assert histogram_quantile(0.95, {0.1: 3}) is None  # no +Inf bucket: not a histogram


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return None


def _serve(registry: CollectorRegistry) -> tuple[WSGIServer, str]:
    server = make_server("127.0.0.1", 0, make_wsgi_app(registry), handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/metrics"


def test_endpoint_reader_measures_only_the_window_and_only_its_revision() -> None:
    reg = CollectorRegistry()
    labels = ["model_name", "revision"]
    ttft = Histogram("kvpilot:time_to_first_token_seconds", "", labels, buckets=(0.1, 0.2, 0.4), registry=reg)
    Histogram("kvpilot:inter_token_latency_seconds", "", labels, buckets=(0.01, 0.1), registry=reg)
    tokens = Counter("kvpilot:generation_tokens", "", labels, registry=reg)
    for _ in range(20):  # before the window: must not count
        ttft.labels("m", "trial-1").observe(5.0)
    tokens.labels("m", "trial-1").inc(1000)
    tokens.labels("m", "other").inc(777)
    server, url = _serve(reg)
    try:
        reader = EndpointReader(url, {"model_name": "m", "revision": "trial-1"})
        start = reader.mark()
        for value in [0.05] * 50 + [0.15] * 40 + [0.3] * 10:
            ttft.labels("m", "trial-1").observe(value)
        tokens.labels("m", "trial-1").inc(300)
        tokens.labels("m", "other").inc(999)
        time.sleep(0.05)
        w = reader.window(start, reader.mark())
    finally:
        server.shutdown()
    assert w.output_tokens == 300
    assert w.ttft_p95_s == pytest.approx(0.3)
    assert w.itl_p95_s is None  # nothing observed
    assert w.output_tokens_per_s > 0 and "/metrics" in w.source


def test_parse_metrics_sums_matching_series() -> None:
    text = (
        '# TYPE kvpilot:generation_tokens counter\n'
        'kvpilot:generation_tokens_total{revision="a",pod="p1"} 5\n'
        'kvpilot:generation_tokens_total{revision="a",pod="p2"} 7\n'
        'kvpilot:generation_tokens_total{revision="b",pod="p1"} 100\n'
        '# TYPE kvpilot:inter_token_latency_seconds histogram\n'
        'kvpilot:inter_token_latency_seconds_bucket{revision="a",le="0.1"} 1\n'
        'kvpilot:inter_token_latency_seconds_bucket{revision="a",le="+Inf"} 2\n'
        'kvpilot:inter_token_latency_seconds_count{revision="a"} 2\n'
        'kvpilot:inter_token_latency_seconds_sum{revision="a"} 0.3\n'
    )
    counters, buckets = parse_metrics(text, {"revision": "a"})
    assert counters == {GENERATION_TOKENS: 12}
    assert buckets == {ITL: {0.1: 1, math.inf: 2}}
