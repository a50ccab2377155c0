"""Verification: the smoke completion over HTTP, and the SLO window through prometheus-api-client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kvpilot.operator.spec import SLOSpec, parse_spec
from kvpilot.operator.verify import judge_slo, read_slo_window, smoke_completion
from kvpilot.tuner.metrics import Prometheus, PrometheusError

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


LABELS = {"namespace": "team-a", "inferenceservice": "llm", "revision": "abc123"}


def test_slo_window_from_prometheus(prometheus: FakePrometheus):
    obs = read_slo_window(Prometheus(prometheus.url), LABELS, "abc123", 120)
    assert (obs.ttft_p95_ms, obs.itl_p95_ms, obs.tokens_per_second) == (250.0, 40.0, 1500.0)
    assert prometheus.queries[0] == (
        'histogram_quantile(0.95, sum by (le) (rate(kvpilot:time_to_first_token_seconds_bucket'
        '{inferenceservice="llm",namespace="team-a",revision="abc123"}[120s])))')
    assert judge_slo(obs, SLOSpec(ttft_p95_ms=300, itl_p95_ms=50), check_throughput=True).ok
    verdict = judge_slo(obs, SLOSpec(ttft_p95_ms=200, min_throughput_tokens_per_second=2000), check_throughput=True)
    assert not verdict.ok and "TTFT p95 250.0 ms > 200.0 ms" in verdict.message and "throughput" in verdict.message
    assert judge_slo(obs, SLOSpec(min_throughput_tokens_per_second=2000), check_throughput=False) is None


def test_no_samples_is_no_verdict(prometheus: FakePrometheus):
    prometheus.values = {"time_to_first_token": "NaN"}
    obs = read_slo_window(Prometheus(prometheus.url), LABELS, "abc123", 60)
    assert obs.ttft_p95_ms is None and obs.tokens_per_second is None
    assert judge_slo(obs, SLOSpec(ttft_p95_ms=100), check_throughput=True) is None


def test_label_values_are_escaped_and_errors_carry_no_response_body():
    hostile = {"namespace": 'a"} or vector(1) or {x="', "inferenceservice": "b\\", "revision": "c\nd"}
    fake = FakePrometheus()
    try:
        read_slo_window(Prometheus(fake.url), hostile, "c", 60)
        assert fake.queries[0].count('"') == 6 + 2  # three values quoted, the injected quote escaped
        assert 'namespace="a\\"} or vector(1) or {x=\\""' in fake.queries[0]
    finally:
        fake.close()
    secret = ForbiddenPrometheus()
    try:
        with pytest.raises(PrometheusError) as caught:
            read_slo_window(Prometheus(secret.url), LABELS, "abc123", 60)
        assert str(caught.value) == "Prometheus query failed: HTTP 403" and "s3cr3t" not in str(caught.value)
    finally:
        secret.close()


class ForbiddenPrometheus(FakePrometheus):
    def __init__(self) -> None:
        super().__init__()
        handler = self.server.RequestHandlerClass

        def forbidden(request: object) -> None:
            request.send_response(403)  # type: ignore[attr-defined]
            request.end_headers()  # type: ignore[attr-defined]
            request.wfile.write(b"internal token s3cr3t")  # type: ignore[attr-defined]

        handler.do_GET = handler.do_POST = forbidden  # type: ignore[attr-defined]


def test_tls_is_verified_and_a_ca_bundle_can_be_given():
    """Before: PrometheusConnect(disable_ssl=True) everywhere."""
    assert Prometheus("https://prometheus.example")._prom._session.verify is True
    assert Prometheus("https://prometheus.example", "/etc/ca/bundle.pem")._prom._session.verify == "/etc/ca/bundle.pem"
