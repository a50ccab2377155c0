"""Verification: the smoke completion over HTTP, and the SLO window through prometheus-api-client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kvpilot.operator.spec import SLOSpec, parse_spec
from kvpilot.operator.verify import judge_slo, promql_quantile, read_slo_window, smoke_completion

from .conftest import BASE_SPEC
from .harness import FakePrometheus, PodDouble


@pytest.fixture()
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus({"time_to_first_token": "0.25", "inter_token": "0.04", "generation_tokens": "1500"})
    yield fake
    fake.close()


def test_smoke_completion_through_the_url_template(pods: PodDouble):
    spec = parse_spec(BASE_SPEC)
    url = pods.url_template.format(name="llm-preview")
    assert smoke_completion(url, spec).ok
    assert pods.calls[-1] == ("llm-preview", {"model": "demo", "prompt": "Hello", "max_tokens": 8, "temperature": 0})
    pods.healthy["llm-preview"] = False
    failed = smoke_completion(url, spec)
    assert not failed.ok and failed.reason == "SmokeTestFailed" and "503" in failed.message
    unreachable = smoke_completion("http://127.0.0.1:9", spec)
    assert not unreachable.ok and unreachable.reason == "SmokeTestUnreachable"


def test_slo_window_from_prometheus(prometheus: FakePrometheus):
    obs = read_slo_window(prometheus.url, "abc123", 120)
    assert (obs.ttft_p95_ms, obs.itl_p95_ms, obs.tokens_per_second) == (250.0, 40.0, 1500.0)
    assert prometheus.queries[0] == promql_quantile("time_to_first_token_seconds", "abc123", 120)
    assert 'revision="abc123"' in prometheus.queries[0] and "[120s]" in prometheus.queries[0]
    assert judge_slo(obs, SLOSpec(ttft_p95_ms=300, itl_p95_ms=50), check_throughput=True).ok
    verdict = judge_slo(obs, SLOSpec(ttft_p95_ms=200, min_throughput_tokens_per_second=2000), check_throughput=True)
    assert not verdict.ok and "TTFT p95 250.0 ms > 200.0 ms" in verdict.message and "throughput" in verdict.message
    assert judge_slo(obs, SLOSpec(min_throughput_tokens_per_second=2000), check_throughput=False) is None


def test_no_samples_is_no_verdict(prometheus: FakePrometheus):
    prometheus.values = {"time_to_first_token": "NaN"}
    obs = read_slo_window(prometheus.url, "abc123", 60)
    assert obs.ttft_p95_ms is None and obs.tokens_per_second is None
    assert judge_slo(obs, SLOSpec(ttft_p95_ms=100), check_throughput=True) is None
