"""Checks a candidate must pass before it takes traffic, and the SLO reading of a live revision.

The smoke completion goes over HTTP to the preview Service; the URL comes from a template so that
tests and the e2e harness can point it at a local server. SLO windows come from Prometheus.
"""

from __future__ import annotations

import math

import httpx
from kvpilot.operator.spec import InferenceServiceSpec, SLOSpec
from kvpilot.operator.status import SLOObservation, now
from prometheus_api_client import PrometheusConnect
from pydantic import BaseModel, Field, ValidationError


class _Choice(BaseModel):
    text: str


class _Completion(BaseModel):
    choices: list[_Choice] = Field(min_length=1)


class CheckResult(BaseModel):
    ok: bool
    reason: str
    message: str


def smoke_completion(url: str, spec: InferenceServiceSpec, api_key: str | None = None) -> CheckResult:
    """One short greedy completion; any valid OpenAI-shaped answer passes."""
    body = {
        "model": spec.model.name,
        "prompt": spec.rollout.verify.smoke_prompt,
        "max_tokens": spec.rollout.verify.smoke_max_tokens,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(
            f"{url}/v1/completions", json=body, headers=headers, timeout=spec.rollout.verify.timeout_seconds
        )
    except httpx.HTTPError as exc:
        return CheckResult(ok=False, reason="SmokeTestUnreachable", message=f"{url}: {exc!r}")
    if response.status_code != 200:
        return CheckResult(
            ok=False, reason="SmokeTestFailed", message=f"{url}: HTTP {response.status_code}: {response.text[:200]}"
        )
    try:
        completion = _Completion.model_validate_json(response.content)
    except ValidationError as exc:
        return CheckResult(ok=False, reason="SmokeTestFailed", message=f"{url}: not a completion: {exc}")
    return CheckResult(
        ok=True, reason="SmokeTestPassed", message=f"completion of {len(completion.choices[0].text)} chars"
    )


def promql_quantile(metric: str, revision: str, window_seconds: float, quantile: float = 0.95) -> str:
    return (
        f'histogram_quantile({quantile}, sum by (le) (rate(kvpilot:{metric}_bucket{{revision="{revision}"}}'
        f"[{int(window_seconds)}s])))"
    )


def promql_tokens_per_second(revision: str, window_seconds: float) -> str:
    return f'sum(rate(kvpilot:generation_tokens_total{{revision="{revision}"}}[{int(window_seconds)}s]))'


def _scalar(prom: PrometheusConnect, query: str) -> float | None:
    """The single value of an instant query; None when there are no samples (no traffic yet)."""
    result = prom.custom_query(query)
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value


def read_slo_window(prometheus_url: str, revision: str, window_seconds: float) -> SLOObservation:
    prom = PrometheusConnect(url=prometheus_url, disable_ssl=True)
    ttft = _scalar(prom, promql_quantile("time_to_first_token_seconds", revision, window_seconds))
    itl = _scalar(prom, promql_quantile("inter_token_latency_seconds", revision, window_seconds))
    tps = _scalar(prom, promql_tokens_per_second(revision, window_seconds))
    return SLOObservation(
        revision=revision,
        window_seconds=window_seconds,
        ttft_p95_ms=None if ttft is None else round(ttft * 1000, 2),
        itl_p95_ms=None if itl is None else round(itl * 1000, 2),
        tokens_per_second=None if tps is None else round(tps, 2),
        observed_at=now(),
    )


def judge_slo(obs: SLOObservation, slo: SLOSpec, check_throughput: bool) -> CheckResult | None:
    """None when there is nothing to judge (no SLO declared, or no samples in the window).

    Throughput is judged only for the live revision: a candidate's preview gets little traffic.
    """
    failures: list[str] = []
    judged = False
    for label, seen, limit in (
        ("TTFT p95", obs.ttft_p95_ms, slo.ttft_p95_ms),
        ("ITL p95", obs.itl_p95_ms, slo.itl_p95_ms),
    ):
        if limit is not None and seen is not None:
            judged = True
            if seen > limit:
                failures.append(f"{label} {seen:.1f} ms > {limit:.1f} ms")
    floor = slo.min_throughput_tokens_per_second
    if check_throughput and floor is not None and obs.tokens_per_second is not None:
        judged = True
        if obs.tokens_per_second < floor:
            failures.append(f"throughput {obs.tokens_per_second:.1f} tok/s < {floor:.1f}")
    if not judged:
        return None
    if failures:
        return CheckResult(ok=False, reason="SLOViolated", message="; ".join(failures))
    return CheckResult(
        ok=True, reason="SLOMet", message=f"revision {obs.revision} within SLO over {obs.window_seconds:.0f}s"
    )
