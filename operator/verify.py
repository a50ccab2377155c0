"""Checks a candidate must pass before it takes traffic, and the SLO reading of a live revision.

The smoke completion goes over HTTP to the preview Service; the URL comes from a template so that
tests and the e2e harness can point it at a local server. SLO windows come from Prometheus.
"""

from __future__ import annotations

import httpx
from kvpilot.operator.spec import InferenceServiceSpec
from kvpilot.operator.status import SLOObservation, now
from kvpilot.tuner.metrics import Prometheus, live_window
from kvpilot.tuner.objective import SLO
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


def read_slo_window(prom: Prometheus, labels: dict[str, str], revision: str, window_seconds: float) -> SLOObservation:
    """A revision's SLO reading over the last window, through the tuner's one Prometheus path."""
    live = live_window(prom, labels, window_seconds)

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000, 2)

    return SLOObservation(
        revision=revision, window_seconds=window_seconds, ttft_p95_ms=ms(live.ttft_p95_s),
        itl_p95_ms=ms(live.itl_p95_s),
        tokens_per_second=None if live.tokens_per_second is None else round(live.tokens_per_second, 2),
        observed_at=now(),
    )


def judge_slo(obs: SLOObservation, slo: SLO, check_throughput: bool) -> CheckResult | None:
    """None when there is nothing to judge (no SLO declared, or no samples in the window). The judge is the
    tuner's (`SLO.judge`), so a trial, a candidate and the live revision are held to the same rule.

    Throughput is judged only for the live revision: a candidate's preview gets little traffic.
    """

    def seconds(ms: float | None) -> float | None:
        return None if ms is None else ms / 1000

    verdict = slo.judge(seconds(obs.ttft_p95_ms), seconds(obs.itl_p95_ms), obs.tokens_per_second, check_throughput)
    if verdict is None:
        return None
    met, failures = verdict
    if not met:
        return CheckResult(ok=False, reason="SLOViolated", message="; ".join(failures))
    return CheckResult(
        ok=True, reason="SLOMet", message=f"revision {obs.revision} within SLO over {obs.window_seconds:.0f}s"
    )
