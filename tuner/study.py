"""The study: constrained TPE over the search space, with infeasible configurations remembered.

Every trial is kept as a `TrialRecord` (plain JSON), and the Optuna study is rebuilt from the records
on load, so the same state persists in a local JSON file or an InferenceService's ConfigMap.

Constraints go through `trial.set_constraint`, which Optuna 5 made the successor of
`TPESampler(constraints_func=...)` (now deprecated); the TPE sampler reads them the same way.
A configuration that crashed, ran out of memory or never became ready is never run again, and neither
is any suggestion within `neighbourhood` of it (unit-scaled, every knob): those are told to the sampler
as infeasible without running, which steers TPE away from the region.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import optuna
from kvpilot.tuner.objective import TrialOutcome
from kvpilot.tuner.space import SearchSpace, Value
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

Params = dict[str, Value]


class TrialRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    number: int = Field(ge=0, description="Optuna's trial number (skipped suggestions included)")
    params: Params
    outcome: TrialOutcome
    ran: bool = Field(description="false: not run, answered from a known infeasible or duplicate config")
    note: str = ""
    duration_s: float = 0.0


class StudyState(BaseModel):
    """Everything needed to continue a study after a restart."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    space: SearchSpace
    seed: int = 0
    records: list[TrialRecord] = Field(default_factory=list)


class Proposal(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    trial: optuna.Trial
    params: Params


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for k in space.knobs:
        if not k.searched:
            continue
        if k.kind == "category":
            out[k.name] = CategoricalDistribution(list(k.categories or ()))
        elif k.kind == "choice":
            out[k.name] = CategoricalDistribution(list(k.choices or ()))
        elif k.kind == "int":
            out[k.name] = IntDistribution(int(k.bounds[0]), int(k.bounds[1]), log=k.log)
        else:
            out[k.name] = FloatDistribution(*k.bounds, log=k.log)
    return out


class TunerStudy:
    def __init__(self, state: StudyState, neighbourhood: float = 0.05, n_startup_trials: int = 3,
                 max_skips: int = 200) -> None:
        self.state = state
        self.space = state.space
        self.neighbourhood = neighbourhood
        self.max_skips = max_skips
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # offset by the records so a study rebuilt after every trial (in cluster) does not replay the same draws
        sampler = optuna.samplers.TPESampler(seed=state.seed + len(state.records), n_startup_trials=n_startup_trials,
                                             multivariate=True)
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self._dists = distributions(self.space)
        for r in state.records:
            self.study.add_trial(optuna.trial.create_trial(
                params={k: v for k, v in r.params.items() if k in self._dists}, distributions=self._dists,
                value=r.outcome.goodput_per_gpu, constraints={"slo": r.outcome.constraints[0]},
            ))

    @property
    def records(self) -> list[TrialRecord]:
        return self.state.records

    @property
    def trials_run(self) -> int:
        return sum(r.ran for r in self.records)

    def best(self) -> TrialRecord | None:
        ok = [r for r in self.records if r.outcome.status == "ok"]
        return max(ok, key=lambda r: r.outcome.goodput_per_gpu, default=None)

    def infeasible(self) -> list[TrialRecord]:
        return [r for r in self.records if r.ran and r.outcome.status == "infeasible"]

    def enqueue(self, params: Mapping[str, Value]) -> None:
        """Run this configuration next (e.g. the engine's defaults as a baseline); unknown knobs are an error."""
        unknown = set(params) - {k.name for k in self.space.knobs}
        if unknown:
            raise ValueError(f"unknown knobs {sorted(unknown)}: the space has {[k.name for k in self.space.knobs]}")
        outside = [f"{k.name}={params[k.name]}" for k in self.space.knobs if k.name in params
                   and not k.contains(params[k.name])]
        if outside:
            raise ValueError(f"outside the search space: {', '.join(outside)} (widen it with --search)")
        self.study.enqueue_trial({k: v for k, v in params.items() if k in self._dists}, skip_if_exists=False)

    def _verdict(self, params: Params) -> tuple[TrialRecord, str] | None:
        """A past record that answers `params` without running it: the same config, or one near an infeasible one."""
        for r in self.records:
            if not r.ran:
                continue
            if r.params == params:
                return r, f"same configuration as trial {r.number}"
            if r.outcome.status == "infeasible" and self.space.distance(r.params, params) <= self.neighbourhood:
                return r, f"within {self.neighbourhood:g} of infeasible trial {r.number}"
        return None

    def ask(self) -> Proposal | None:
        """The next configuration worth running; None when the sampler only offers known or forbidden ones."""
        for _ in range(self.max_skips):
            trial = self.study.ask()
            params = self.space.canonical(self.space.suggest(trial))
            verdict = self._verdict(params)
            if verdict is None:
                return Proposal(trial=trial, params=params)
            past, why = verdict
            log.info("not running %s: %s (%s)", params, why, past.outcome.status)
            outcome = past.outcome if past.params == params else TrialOutcome(
                status="infeasible", reason=f"{why}: {past.outcome.reason}")
            self._tell(trial, params, outcome, ran=False, note=why, duration_s=0.0)
        return None

    def record(self, params: Params, outcome: TrialOutcome, duration_s: float, note: str = "") -> TrialRecord:
        """Add a finished trial that was proposed by an earlier process (the in-cluster driver survives restarts
        this way: it keeps only the proposed params, never a live Optuna trial)."""
        self.study.add_trial(optuna.trial.create_trial(
            params={k: v for k, v in params.items() if k in self._dists}, distributions=self._dists,
            value=outcome.goodput_per_gpu, constraints={"slo": outcome.constraints[0]}))
        record = TrialRecord(number=len(self.state.records), params=dict(params), outcome=outcome, ran=True,
                             note=note, duration_s=duration_s)
        self.state.records.append(record)
        return record

    def tell(self, proposal: Proposal, outcome: TrialOutcome, duration_s: float, note: str = "") -> TrialRecord:
        return self._tell(proposal.trial, proposal.params, outcome, ran=True, note=note, duration_s=duration_s)

    def _tell(self, trial: optuna.Trial, params: Params, outcome: TrialOutcome, ran: bool, note: str,
              duration_s: float) -> TrialRecord:
        trial.set_constraint("slo", outcome.constraints[0])
        self.study.tell(trial, outcome.goodput_per_gpu)
        record = TrialRecord(number=trial.number, params=params, outcome=outcome, ran=ran, note=note,
                             duration_s=duration_s)
        self.state.records.append(record)
        return record
