"""The objective: goodput per GPU, i.e. the highest generation throughput at which the SLOs still hold.

Each trial searches the request rate: it doubles the offered rate while the SLOs hold and bisects once
they break. `RateSearch` is the pure part of that (no server, no clock), so it is tested on its own and
shared by the local loop, the in-cluster driver and the H100 surface recorder.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SLO(BaseModel):
    """Latency and throughput targets (milliseconds, as `spec.slo` has them): the one SLO model, and its judge,
    for the tuner, the operator's verification and the live reading alike."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_p95_ms: float | None = Field(default=None, gt=0, description="Time to first token, p95, ms.")
    itl_p95_ms: float | None = Field(default=None, gt=0, description="Inter-token latency, p95, ms.")
    min_throughput_tokens_per_second: float | None = Field(
        default=None, ge=0, description="Generated tokens per second the whole service must sustain."
    )

    def tightened(self, headroom: float) -> SLO:
        """Latency targets `headroom` below the real ones: what a trial must meet to be credited, so the credited
        rate still meets the real SLO when measured again (p95s of short steps are noisy)."""
        return self.model_copy(update={
            "ttft_p95_ms": None if self.ttft_p95_ms is None else self.ttft_p95_ms * (1 - headroom),
            "itl_p95_ms": None if self.itl_p95_ms is None else self.itl_p95_ms * (1 - headroom),
        })

    def overshoot(self, ttft_p95_s: float | None, itl_p95_s: float | None) -> dict[str, float | None]:
        """Per latency target that is declared: how far over it the reading is (relative; <= 0 within it),
        None where there is no reading."""
        out: dict[str, float | None] = {}
        for label, target_ms, got_s in (("TTFT p95", self.ttft_p95_ms, ttft_p95_s),
                                         ("ITL p95", self.itl_p95_ms, itl_p95_s)):
            if target_ms is not None:
                out[label] = None if got_s is None else got_s * 1000 / target_ms - 1
        return out

    def judge(self, ttft_p95_s: float | None, itl_p95_s: float | None, tokens_per_second: float | None,
              check_throughput: bool) -> tuple[bool, list[str]] | None:
        """(met, what failed) over the readings there are; None when there is nothing to judge."""
        failures: list[str] = []
        judged = False
        for label, over in self.overshoot(ttft_p95_s, itl_p95_s).items():
            if over is not None:
                judged = True
                if over > 0:
                    seen = ttft_p95_s if label.startswith("TTFT") else itl_p95_s
                    limit = self.ttft_p95_ms if label.startswith("TTFT") else self.itl_p95_ms
                    failures.append(f"{label} {(seen or 0) * 1000:.1f} ms > {limit:.1f} ms")
        floor = self.min_throughput_tokens_per_second
        if check_throughput and floor is not None and tokens_per_second is not None:
            judged = True
            if tokens_per_second < floor:
                failures.append(f"throughput {tokens_per_second:.1f} tok/s < {floor:.1f}")
        return (not failures, failures) if judged else None


class Measurement(BaseModel):
    """One load step: what the engine did at one offered request rate, read from the metrics."""

    model_config = ConfigDict(extra="forbid")

    request_rate: float = Field(gt=0)
    output_tokens_per_s: float = Field(ge=0)
    ttft_p95_s: float | None = None
    itl_p95_s: float | None = None
    requests_ok: int = 0
    requests_failed: int = 0
    failures: dict[str, int] = Field(default_factory=dict)
    source: str = Field(default="", description="where the latency figures came from (prometheus, /metrics)")

    def violation(self, slo: SLO) -> float:
        """How far over the SLOs, as the largest relative overshoot (0 when met)."""
        worst = 0.0
        for over in slo.overshoot(self.ttft_p95_s, self.itl_p95_s).values():
            # requests completed but the metrics saw nothing: not evidence the SLO held
            worst = max(worst, (1.0 if self.requests_ok else 0.0) if over is None else over)
        if self.requests_failed:
            worst = max(worst, self.requests_failed / max(1, self.requests_ok + self.requests_failed))
        return worst

    def meets(self, slo: SLO) -> bool:
        return self.requests_ok > 0 and self.violation(slo) == 0.0


class RateSearchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    start_rate: float = Field(default=4.0, gt=0, description="requests/s of the first step")
    max_rate: float = Field(default=1000.0, gt=0)
    min_rate: float = Field(default=0.25, gt=0, description="below this the configuration cannot meet the SLO")
    steps: int = Field(default=3, ge=1, le=20, description="load steps per trial")
    growth: float = Field(default=2.0, gt=1.0)
    headroom: float = Field(default=0.2, ge=0, lt=1, description="steps must beat the latency SLO by this share")


class RateSearch:
    """Which rate to offer next, given what each step measured.

    Below any known-good rate there is nothing to learn, above a known-bad one neither: it grows the rate
    while steps meet the SLO, then bisects (geometrically) between the best good and the lowest bad rate.
    """

    def __init__(self, slo: SLO, settings: RateSearchSettings) -> None:
        self.target = slo
        self.slo = slo.tightened(settings.headroom)
        self.settings = settings
        self.steps: list[Measurement] = []

    @property
    def good(self) -> list[Measurement]:
        return [m for m in self.steps if m.meets(self.slo)]

    @property
    def best(self) -> Measurement | None:
        return max(self.good, key=lambda m: m.output_tokens_per_s, default=None)

    def next_rate(self) -> float | None:
        s = self.settings
        if len(self.steps) >= s.steps:
            return None
        if not self.steps:
            return min(s.start_rate, s.max_rate)
        good = [m.request_rate for m in self.good]
        bad = [m.request_rate for m in self.steps if not m.meets(self.slo)]
        lo, hi = max(good, default=None), min(bad, default=None)
        if hi is None:
            nxt = min((lo or s.start_rate) * s.growth, s.max_rate)
            return None if lo is not None and nxt <= lo else nxt
        if lo is None:
            nxt = hi / s.growth
            return None if nxt < s.min_rate else nxt
        if hi / lo < 1.1:  # close enough: another step would not move goodput by more than ~10%
            return None
        return (lo * hi) ** 0.5

    def record(self, m: Measurement) -> None:
        self.steps.append(m)


TrialStatus = Literal["ok", "slo_unmet", "infeasible"]


class TrialOutcome(BaseModel):
    """What one configuration achieved; `constraints` feed Optuna's constrained TPE (<= 0 is feasible)."""

    model_config = ConfigDict(extra="forbid")

    status: TrialStatus
    goodput_tokens_per_s: float = Field(default=0.0, ge=0, description="whole service")
    goodput_per_gpu: float = Field(default=0.0, ge=0, description="the objective")
    request_rate: float | None = None
    ttft_p95_s: float | None = None
    itl_p95_s: float | None = None
    violation: float = Field(default=0.0, ge=0, description="how far over the SLO the gentlest step was")
    reason: str = ""
    steps: list[Measurement] = Field(default_factory=list)

    @property
    def constraints(self) -> list[float]:
        """One value per constraint: SLO violation; infeasible configurations get a large fixed penalty."""
        if self.status == "infeasible":
            return [10.0]
        return [self.violation]


def outcome(search: RateSearch, gpus: int) -> TrialOutcome:
    """The trial's result from its load steps: the best step that met the SLO, or how badly the gentlest missed."""
    slo = search.slo
    best = search.best
    if best is None:
        gentlest = min(search.steps, key=lambda m: m.request_rate, default=None)
        v = gentlest.violation(slo) if gentlest else 1.0
        return TrialOutcome(status="slo_unmet", violation=max(v, 1e-3), steps=search.steps,
                            request_rate=gentlest.request_rate if gentlest else None,
                            ttft_p95_s=gentlest.ttft_p95_s if gentlest else None,
                            itl_p95_s=gentlest.itl_p95_s if gentlest else None,
                            reason="no offered rate met the SLO")
    total = best.output_tokens_per_s
    floor = slo.min_throughput_tokens_per_second
    short = 0.0 if floor is None or total >= floor else 1 - total / floor
    return TrialOutcome(
        status="ok" if short == 0 else "slo_unmet", goodput_tokens_per_s=total, goodput_per_gpu=total / max(1, gpus),
        request_rate=best.request_rate, ttft_p95_s=best.ttft_p95_s, itl_p95_s=best.itl_p95_s, violation=short,
        steps=search.steps, reason="" if short == 0 else f"goodput {total:.0f} tok/s is below the floor {floor:.0f}",
    )


def confirmed_outcome(search: RateSearch, confirm: Measurement, gpus: int) -> TrialOutcome:
    """The trial's result once its best rate was measured again over a longer step.

    Short steps under-read TTFT just above capacity (the queue has not built up yet); the longer confirm
    step catches that. Confirmed: the confirm step is what the trial is credited with. Not confirmed: the
    best rate strictly below it is credited, or none.
    """
    steps = [*search.steps, confirm]
    credited = RateSearch(search.target, search.settings)
    if confirm.meets(search.slo):
        credited.record(confirm)
        return outcome(credited, gpus).model_copy(update={"steps": steps})
    for m in search.steps:
        if m.request_rate < confirm.request_rate:
            credited.record(m)
    credited.record(confirm)
    result = outcome(credited, gpus)
    why = f"{confirm.request_rate:.2f} req/s did not hold over the confirm step"
    return result.model_copy(update={"steps": steps, "reason": "; ".join(x for x in (result.reason, why) if x)})
