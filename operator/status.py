"""InferenceService status: what the operator observed and where a rollout stands.

Everything a restarted operator needs to resume lives here; the operator keeps no state in memory.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from kvpilot.operator.engine_knobs import EngineKnobs
from kvpilot.operator.spec import CRDModel
from pydantic import Field

Phase = Literal["Pending", "Deploying", "Ready", "Upgrading", "Tuning", "Degraded", "Failed"]
ConditionType = Literal["Ready", "Progressing", "SLOMet", "Tuned", "Degraded", "RouterReady"]
RolloutStep = Literal["Deploying", "Verifying", "Failed"]
HISTORY_LIMIT = 10
RECOMMENDATION_LIMIT = 64


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


class Condition(CRDModel):
    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: dt.datetime
    observed_generation: int | None = None


# The engine knobs a revision runs with, every one filled in (EngineConfig's fields: engine_knobs.py).
EngineConfigStatus = EngineKnobs


class SLOObservation(CRDModel):
    revision: str
    window_seconds: float
    ttft_p95_ms: float | None = None
    itl_p95_ms: float | None = None
    tokens_per_second: float | None = None
    observed_at: dt.datetime


class RolloutState(CRDModel):
    """One blue-green rollout in flight; `step` is the state machine's state."""

    revision: str
    step: RolloutStep
    started_at: dt.datetime
    verify_started_at: dt.datetime | None = None
    smoke_attempts: int = 0
    smoke_passed: bool = False
    reason: str | None = None
    message: str | None = None


class RetiringRevision(CRDModel):
    revision: str
    delete_after: dt.datetime


class HistoryEntry(CRDModel):
    revision: str
    result: Literal["Promoted", "RolledBack", "Superseded", "Failed"]
    reason: str
    message: str = ""
    at: dt.datetime


class TrialSummary(CRDModel):
    number: int
    revision: str | None = None
    config: EngineConfigStatus
    precision: str | None = Field(
        default=None, description="weights and KV cache precision, e.g. `fp8 weights, fp8 KV cache` "
        "(`checkpoint weights`: as the checkpoint stores them)")
    feasible: bool
    goodput_tokens_per_second: float | None = None
    ttft_p95_ms: float | None = None
    itl_p95_ms: float | None = None


class TuningStatus(CRDModel):
    """Filled by the tuner (issue 6); the operator only carries it."""

    state: Literal["Idle", "Running", "Done", "Failed"] = "Idle"
    trials_run: int = 0
    current_trial: TrialSummary | None = None
    best: TrialSummary | None = None
    study_config_map: str | None = None
    message: str | None = None


class RouterStatus(CRDModel):
    """The routers in front of the engines, and what the stable Service selects."""

    replicas: int = 0
    ready_replicas: int = 0
    stable_selects: Literal["routers", "engines"] = Field(
        default="routers", description="engines: no router is ready, so the stable Service selects the active "
        "revision's engines directly (no prefix routing, no queue) until one is.")
    tokenizer: str | None = Field(default=None, description="What the routers tokenize with; none: text prompts "
                                  "route by their leading characters.")


class Recommendation(CRDModel):
    at: dt.datetime
    replicas: int


class AutoscalingStatus(CRDModel):
    """What the autoscaler read, wants and why; its recent recommendations are its stabilisation windows' memory,
    kept here so that an operator restart does not forget them."""

    desired_replicas: int
    current_replicas: int = 0
    reason: str
    message: str = ""
    signal_value: float | None = Field(default=None, description="The last reading of spec.autoscaling.signal.")
    last_scale_time: dt.datetime | None = None
    recommendations: list[Recommendation] = Field(default_factory=list, max_length=RECOMMENDATION_LIMIT)


class InferenceServiceStatus(CRDModel):
    phase: Phase = "Pending"
    observed_generation: int | None = None
    active_revision: str | None = None
    candidate_revision: str | None = None
    failed_revision: str | None = Field(
        default=None, description="A rolled-back revision; not retried until the spec changes again."
    )
    engine_config: EngineConfigStatus | None = None
    ready_replicas: int = 0
    rollout: RolloutState | None = None
    retiring: list[RetiringRevision] = Field(default_factory=list)
    history: list[HistoryEntry] = Field(default_factory=list, max_length=HISTORY_LIMIT)
    slo: SLOObservation | None = None
    ttft_p95_ms: float | None = Field(default=None, description="Last observed TTFT p95 (printer column).")
    tokens_per_second: float | None = Field(default=None, description="Last observed throughput.")
    tuning: TuningStatus | None = None
    router: RouterStatus | None = None
    autoscaling: AutoscalingStatus | None = None
    conditions: list[Condition] = Field(default_factory=list)

    def condition(self, kind: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)

    def set_condition(
        self, kind: ConditionType, status: bool | None, reason: str, message: str = "", generation: int | None = None
    ) -> None:
        """Upsert a condition; the transition time moves only when the status flips."""
        value = "Unknown" if status is None else ("True" if status else "False")
        old = self.condition(kind)
        since = old.last_transition_time if old is not None and old.status == value else now()
        new = Condition(
            type=kind,
            status=value,
            reason=reason,
            message=message,
            last_transition_time=since,
            observed_generation=generation,
        )
        self.conditions = [c for c in self.conditions if c.type != kind] + [new]
        self.conditions.sort(key=lambda c: c.type)

    def record(self, entry: HistoryEntry) -> None:
        self.history = [*self.history, entry][-HISTORY_LIMIT:]


def load_status(raw: dict | None) -> InferenceServiceStatus:
    """Our part of a CR's status; keys written by others (kopf) are ignored."""
    known = set(InferenceServiceStatus.model_fields) | {
        f.alias for f in InferenceServiceStatus.model_fields.values() if f.alias
    }
    ours = {k: v for k, v in (raw or {}).items() if k in known}
    return InferenceServiceStatus.model_validate(ours)


def dump_status(status: InferenceServiceStatus) -> dict:
    """Unset fields are left out: applied as `kvpilot`, a field left out is removed from the stored status."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)
