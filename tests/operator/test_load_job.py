"""The tuning load Job (a valid batch/v1 manifest whose pod no Service selects, its result read back) and the
live SLO attainment that restarts a finished study."""

from __future__ import annotations

import json
import math

from kvpilot.operator import resources as res
from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.load_job import SUMMARY_PATH, lengths, load_job, load_result, workload_args
from kvpilot.operator.spec import LengthDistribution, WorkloadSpec, parse_spec
from kvpilot.operator.tuning_observe import TrialObserver
from kvpilot.tuner.metrics import share_within

from .conftest import BASE_SPEC
from .harness import FakePrometheus
from .test_chart_and_examples import validate_k8s


def _job(**tuning: object) -> dict:
    spec = parse_spec({**BASE_SPEC, "engine": {**BASE_SPEC["engine"], "apiKeySecret": "key"}, "tuning": tuning})
    return load_job("llm", "default", spec, "trial-ab12-3", 2, rate=4.0, seconds=10, url="http://llm-tuning:8000")


def test_load_job_is_valid_and_its_pod_joins_no_service():
    job = _job()
    validate_k8s(job)
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert container["command"] == ["kvpilot"] and args[:2] == ["bench", "serve"]
    assert args[args.index("--num-prompts") + 1] == "40" and args[args.index("--summary-file") + 1] == SUMMARY_PATH
    assert container["terminationMessagePath"] == SUMMARY_PATH
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "key", "key": "api-key"}
    assert job["spec"]["backoffLimit"] == 0 and job["metadata"]["name"] == "llm-trial-ab12-3-s2"
    labels = job["spec"]["template"]["metadata"]["labels"]
    for selector in (res.pod_selector("llm"), res.pod_selector("llm", "trial-ab12-3")):
        assert not selector.items() <= labels.items()


def test_workload_lengths_follow_the_declared_distributions():
    assert lengths(LengthDistribution(kind="fixed", mean=64)) == (64, 64)
    assert lengths(LengthDistribution(kind="uniform", mean=100)) == (50, 150)
    assert lengths(LengthDistribution(kind="uniform", mean=100, min=80)) == (80, 120)
    lo, hi = lengths(LengthDistribution(kind="normal", mean=100, stddev=10))
    assert (lo, hi) == (100 - round(10 * math.sqrt(3)), 100 + round(10 * math.sqrt(3)))  # same mean and variance
    shared = workload_args(WorkloadSpec.model_validate({"inputTokens": {"kind": "fixed", "mean": 200},
                                                        "sharedPrefixRatio": 0.75}), num_prompts=10)
    assert shared[shared.index("--prefix-len") + 1] == "150" and shared[shared.index("--suffix-len") + 1] == "50"
    assert int(shared[shared.index("--num-groups") + 1]) * int(shared[shared.index("--prompts-per-group") + 1]) >= 10


def _finished(kind: str) -> dict:
    return {"status": {"conditions": [{"type": kind, "status": "True", "reason": "R", "message": "m"}]}}


def _pod(message: str | None) -> dict:
    terminated = {"exitCode": 0} if message is None else {"exitCode": 0, "message": message}
    return {"status": {"containerStatuses": [{"state": {"terminated": terminated}}]}}


def test_load_result_reads_the_termination_message():
    assert load_result({"status": {}}, [], planned=5) is None  # still running
    summary = {"started_at": 1.5, "completed": 4, "failed": 1, "failures": {"429": 1}}
    result = load_result(_finished("Complete"), [_pod(json.dumps(summary))], planned=5)
    assert result is not None and result.succeeded and result.started_at == 1.5
    assert (result.completed, result.failed, result.failures) == (4, 1, {"429": 1})
    # A client that could not start, or a pod that left nothing behind: every planned request failed.
    for pods in ([_pod(json.dumps({"error": "All connection attempts failed"}))], [_pod(None)], []):
        failed = load_result(_finished("Failed"), pods, planned=5)
        assert failed is not None and failed.started_at is None and failed.failed == 5


def test_attainment_counts_at_the_bucket_bound_below_the_target():
    buckets = {0.1: 50.0, 0.25: 80.0, 0.5: 95.0, math.inf: 100.0}
    assert share_within(buckets, 0.5) == 0.95
    assert share_within(buckets, 0.3) == 0.80  # 0.3 is not a bound: counted at 0.25, never overstated
    assert share_within(buckets, 0.05) == 0.0
    assert share_within({math.inf: 0.0}, 0.5) is None


class BucketsPrometheus(FakePrometheus):
    """Per-bucket increases of the live revision: 90% of first tokens within 0.5 s, 99% of gaps within 50 ms."""

    def value(self, query: str) -> list[tuple[dict[str, str], float]] | None:
        if 'revision="live"' not in query:
            return None
        counts = {"0.25": 60.0, "0.5": 90.0} if "time_to_first_token" in query else {"0.05": 99.0}
        return [({"le": le}, n) for le, n in {**counts, "+Inf": 100.0}.items()]


def test_live_attainment_is_the_worse_share_within_the_slo():
    prometheus = BucketsPrometheus()
    try:
        spec = parse_spec({**BASE_SPEC, "slo": {"ttftP95Ms": 500, "itlP95Ms": 50},
                           "monitoring": {"prometheusUrl": prometheus.url}, "tuning": {"enabled": True}})
        applier = type("Applier", (), {"namespace": "default"})()
        observer = TrialObserver(applier, "llm", spec, OperatorConfig(allowed_prometheus_urls=[prometheus.url]))  # type: ignore[arg-type]
        assert observer._attainment("live") == 0.9
        assert any("sum by (le) (increase(kvpilot:inter_token_latency_seconds_bucket" in q for q in prometheus.queries)
        assert observer._attainment("other") is None  # no traffic: no reason to re-tune
    finally:
        prometheus.close()
