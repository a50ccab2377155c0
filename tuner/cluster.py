"""The in-cluster study as a pure state machine: trials are candidate revisions, load steps are Jobs.

`advance(state, settings, observation)` returns the next state and the actions the operator must carry
out; it never touches the cluster, so an operator restarted at any point reloads the state (persisted
as JSON in a ConfigMap owned by the InferenceService) and continues. Live traffic never sees a trial:
each runs as a candidate revision behind the preview Service, and only the best feasible configuration
is handed to the ordinary blue-green rollout (`Promote`), which verifies it like any other change.

    Idle --enabled--> Deploying --ready--> Loading --job done, metrics read--> (next rate) Loading
      ^                  | not ready in time / crashed                  | rate search over
      |                  v                                              v
      |             trial infeasible -----------------------------> DeleteCandidate, tell study
      +-- retune (attainment below threshold) <-- Done <-- Promote(best) <-- trials spent

What the operator must provide (it executes the actions): create a candidate revision from engine
knobs and report ready / failed (its blue-green machinery), run a `kvpilot bench serve` Job against the
preview Service and report when it finished, read the step's window with `metrics.PrometheusReader`
over the candidate's `revision` label, delete the candidate, start a rollout of the best knobs, and
store `ClusterState.model_dump_json()` in the ConfigMap after every call.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from kvpilot.tuner.metrics import WindowMetrics
from kvpilot.tuner.objective import SLO, Measurement, RateSearch, RateSearchSettings, TrialOutcome, outcome
from kvpilot.tuner.study import Params, StudyState, TunerStudy
from pydantic import BaseModel, ConfigDict, Field

Phase = Literal["Idle", "Deploying", "Loading", "Done", "Failed"]


class ActiveTrial(BaseModel):
    model_config = ConfigDict(extra="forbid")

    params: Params
    revision: str = Field(description="candidate revision name: `<revision_prefix>-<n>`")
    since: dt.datetime = Field(description="when the current phase began")
    steps: list[Measurement] = Field(default_factory=list)
    rate: float | None = Field(default=None, description="the load step in flight")


class ClusterState(BaseModel):
    """Everything the study needs across operator restarts (the ConfigMap's `study.json`)."""

    model_config = ConfigDict(extra="forbid")

    phase: Phase = "Idle"
    study: StudyState
    trial: ActiveTrial | None = None
    promoted: Params | None = None
    message: str = ""


class ClusterSettings(BaseModel):
    """The parts of spec.slo / spec.tuning / spec.rollout the driver reads."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool
    max_trials: int = Field(ge=1)
    slo: SLO
    rate: RateSearchSettings = Field(default_factory=RateSearchSettings)
    step_seconds: float = Field(gt=0, description="spec.tuning.trialDurationSeconds / rate.steps")
    ready_timeout_s: float = Field(gt=0)
    gpus: int = Field(default=1, ge=1)
    retune_below_attainment: float | None = None
    baseline: Params | None = Field(default=None, description="run first (the configuration serving now), so "
                                    "the study's best is measured against it; skipped when outside the space")
    revision_prefix: str = Field(default="trial", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                                 description="trial revisions are `<prefix>-<n>`: unique per study in one Prometheus")


class Observation(BaseModel):
    """What the operator saw this reconcile; fields irrelevant to the current phase are ignored."""

    model_config = ConfigDict(extra="forbid")

    now: dt.datetime
    candidate: Literal["absent", "pending", "ready", "failed"] = "absent"
    candidate_message: str = ""
    load_done: bool = False
    window: WindowMetrics | None = Field(default=None, description="the finished step, read through PromQL")
    requests_ok: int = 0
    requests_failed: int = 0
    failures: dict[str, int] = Field(default_factory=dict)
    live_attainment: float | None = Field(default=None, description="share of live requests within the SLO")


class DeployCandidate(BaseModel):
    kind: Literal["DeployCandidate"] = "DeployCandidate"
    revision: str
    engine: Params


class RunLoad(BaseModel):
    kind: Literal["RunLoad"] = "RunLoad"
    revision: str
    request_rate: float
    seconds: float


class DeleteCandidate(BaseModel):
    kind: Literal["DeleteCandidate"] = "DeleteCandidate"
    revision: str


class Promote(BaseModel):
    kind: Literal["Promote"] = "Promote"
    engine: Params


Action = DeployCandidate | RunLoad | DeleteCandidate | Promote


def _start_trial(state: ClusterState, s: ClusterSettings, now: dt.datetime) -> list[Action]:
    study = TunerStudy(state.study)
    if study.trials_run >= s.max_trials:
        return _finish(state, study)
    params = _baseline(state, s)
    if params is None:
        proposal = study.ask()
        if proposal is None:
            return _finish(state, study)
        params = proposal.params
    revision = f"{s.revision_prefix}-{len(state.study.records)}"
    state.trial = ActiveTrial(params=params, revision=revision, since=now)
    state.phase = "Deploying"
    return [DeployCandidate(revision=revision, engine=params)]


def _baseline(state: ClusterState, s: ClusterSettings) -> Params | None:
    space = state.study.space
    if state.study.records or s.baseline is None or any(k.name not in s.baseline for k in space.knobs):
        return None
    params = space.canonical(s.baseline)
    return params if all(k.contains(params[k.name]) for k in space.knobs) else None


def _finish(state: ClusterState, study: TunerStudy) -> list[Action]:
    best = study.best()
    state.trial = None
    if best is None:
        state.phase, state.message = "Failed", "no configuration met the SLO"
        return []
    state.phase, state.promoted = "Done", best.params
    state.message = f"best: trial {best.number}, {best.outcome.goodput_per_gpu:.0f} tok/s per GPU"
    return [Promote(engine=best.params)]


def _end_trial(state: ClusterState, s: ClusterSettings, result: TrialOutcome, now: dt.datetime) -> list[Action]:
    trial = state.trial
    assert trial is not None
    study = TunerStudy(state.study)
    study.record(trial.params, result, (now - trial.since).total_seconds(), note=trial.revision)
    state.trial, state.phase = None, "Idle"
    return [DeleteCandidate(revision=trial.revision), *_start_trial(state, s, now)]


def _search(trial: ActiveTrial, s: ClusterSettings) -> RateSearch:
    search = RateSearch(s.slo, s.rate)
    for m in trial.steps:
        search.record(m)
    return search


def _load(state: ClusterState, s: ClusterSettings, rate: float, now: dt.datetime) -> list[Action]:
    assert state.trial is not None
    state.trial.rate, state.trial.since, state.phase = rate, now, "Loading"
    return [RunLoad(revision=state.trial.revision, request_rate=rate, seconds=s.step_seconds)]


def advance(state: ClusterState, s: ClusterSettings, obs: Observation) -> tuple[ClusterState, list[Action]]:
    """One reconcile's worth of progress; the caller persists the returned state, then runs the actions."""
    state = state.model_copy(deep=True)
    if not s.enabled:
        return state, []
    if state.phase in ("Done", "Failed"):
        threshold = s.retune_below_attainment
        if threshold is not None and obs.live_attainment is not None and obs.live_attainment < threshold:
            state.phase, state.message = "Idle", f"live SLO attainment {obs.live_attainment:.1%} < {threshold:.0%}"
            state.study.records.clear()
        else:
            return state, []
    if state.phase == "Idle":
        return state, _start_trial(state, s, obs.now)
    trial = state.trial
    assert trial is not None, f"phase {state.phase} without a trial"
    if state.phase == "Deploying":
        if obs.candidate == "failed" or (obs.candidate != "ready"
                                         and (obs.now - trial.since).total_seconds() > s.ready_timeout_s):
            why = obs.candidate_message or f"not ready within {s.ready_timeout_s:.0f} s"
            return state, _end_trial(state, s, TrialOutcome(status="infeasible", reason=why), obs.now)
        if obs.candidate != "ready":
            return state, []
        rate = _search(trial, s).next_rate()
        return state, _load(state, s, rate or s.rate.start_rate, obs.now)
    # Loading
    if obs.candidate == "failed":
        why = f"the candidate failed under load: {obs.candidate_message}"
        return state, _end_trial(state, s, TrialOutcome(status="infeasible", reason=why, steps=trial.steps), obs.now)
    if not obs.load_done:
        return state, []
    if obs.window is None or trial.rate is None:
        raise ValueError("a finished load step needs its metrics window")
    trial.steps.append(Measurement(
        request_rate=trial.rate, output_tokens_per_s=obs.window.output_tokens_per_s, ttft_p95_s=obs.window.ttft_p95_s,
        itl_p95_s=obs.window.itl_p95_s, requests_ok=obs.requests_ok, requests_failed=obs.requests_failed,
        failures=obs.failures, source=obs.window.source))
    if any(code in ("400", "413") for code in obs.failures):
        why = f"the candidate refuses requests of the workload: {obs.failures}"
        return state, _end_trial(state, s, TrialOutcome(status="infeasible", reason=why, steps=trial.steps), obs.now)
    search = _search(trial, s)
    rate = search.next_rate()
    if rate is None:
        return state, _end_trial(state, s, outcome(search, s.gpus), obs.now)
    return state, _load(state, s, rate, obs.now)
