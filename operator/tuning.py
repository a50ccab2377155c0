"""Drives one InferenceService's tuning study (kvpilot.tuner.cluster) a step per reconcile pass: observe
(tuning_observe.py: children and metrics into an Observation), step (the tuner's pure state machine), act
(tuning_act.py: persist the study, apply the trial's children, word the Events); tuning_study.py maps the
spec to the study and the study to status.tuning.

Level-triggered like the rest of the operator: the study lives in a ConfigMap owned by the
InferenceService (`<name>-tuning`: `study.json`, and `basis`, a hash of what the study is about), and
each pass derives from it the children a trial needs — the trial revision's Deployment (one replica),
the `<name>-tuning` Service selecting it (the trial's preview Service: live traffic never reaches a
trial) and the Job of the load step in flight — so an operator restarted between any two writes
converges to the same place. The best configuration is promoted by overlaying its knobs on spec.engine:
that changes the desired revision, which the ordinary blue-green rollout brings up and verifies. A
promotion that the rollout rolls back is dropped, and the study says so.
"""

from __future__ import annotations

import datetime as dt
import hashlib

from kvpilot.operator import resources as res
from kvpilot.operator.apply import Applier
from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.reducer import Event, Part
from kvpilot.operator.rollout import engine_config
from kvpilot.operator.spec import InferenceServiceSpec
from kvpilot.operator.status import InferenceServiceStatus
from kvpilot.operator.tuning_act import TrialActor
from kvpilot.operator.tuning_observe import TrialObserver
from kvpilot.operator.tuning_study import (
    current_knobs,
    effective_spec,
    settings_from_spec,
    space_from_spec,
    study_basis,
    study_name,
    tuning_status,
)
from kvpilot.tuner.cluster import ClusterState, advance
from kvpilot.tuner.study import StudyState


class TuningDriver:
    """One pass of the study for one InferenceService; the reconciler calls `step` after the rollout's."""

    def __init__(self, applier: Applier, name: str, uid: str, spec: InferenceServiceSpec, config: OperatorConfig,
                 state: ClusterState | None, basis: str | None) -> None:
        self.applier, self.name, self.spec, self.config = applier, name, spec, config
        self.stored, self.stored_basis = state, basis
        self.prefix = f"trial-{hashlib.sha256(uid.encode()).hexdigest()[:6]}"
        self.observer = TrialObserver(applier, name, spec, config)
        self.actor = TrialActor(applier, name, spec, config, state, basis, self.observer.get)
        self.changed = False  # the study moved this pass: children to create, or to clean up

    # -- the pass ---------------------------------------------------------------------------------------

    def step(self, status: InferenceServiceStatus, desired: str, at: dt.datetime) -> Part:
        """`status` is this pass's status as the rollout left it; returns tuning's part of the next one."""
        part = Part()
        if not self.spec.tuning.enabled:
            self._disable(part)
            return part
        state, part.events = self._fresh_state()
        settings = settings_from_spec(self.spec, self.prefix).model_copy(
            update={"baseline": current_knobs(effective_spec(self.spec, state))})
        if state.promoted is not None and status.failed_revision == desired:
            state.phase, state.promoted = "Failed", None
            state.message = f"the rollout of the best configuration was rolled back: {self._last_failure(status)}"
            part.events.append(Event("Warning", "TuningPromotionRolledBack", state.message))
        advanced = False
        if self.observer.prometheus is None:
            part.condition("Tuned", False, "PrometheusRequired", "tuning reads trial metrics from Prometheus: the "
                           "operator's (--prometheus-url), or spec.monitoring.prometheusUrl")
        elif status.active_revision is None or status.rollout is not None or status.phase != "Ready":
            if state.phase != "Done":
                part.condition("Tuned", False, "Waiting", "tuning waits for the service to be Ready with no "
                               "rollout in progress")
        else:
            state, actions = advance(state, settings, self.observer.observe(state, settings, status, at))
            part.events += self.actor.describe(state, actions)
            self.changed, advanced = bool(actions), True
        target = res.revision_of(effective_spec(self.spec, state))  # what serves once the study's best is live
        if advanced:
            self._condition(state, status, target, part)
        if state.phase == "Done" and status.active_revision == target:
            part.condition("Tuned", True, "BestPromoted", state.message)
        if self.stored is not None and state != self.stored:
            self.changed = True
        self.actor.save(state)
        self.actor.converge(state, self.changed)
        self._report(state, part)
        return part

    def _fresh_state(self) -> tuple[ClusterState, list[Event]]:
        basis = study_basis(self.spec)
        if self.stored is not None and self.stored_basis == basis:
            return self.stored.model_copy(deep=True), []
        new = ClusterState(study=StudyState(space=space_from_spec(self.spec)),
                           promoted=None if self.stored is None else self.stored.promoted)
        if self.stored is None:
            return new, [Event("Normal", "TuningStarted", f"study {study_name(self.name)} created")]
        return new, [Event("Normal", "TuningRestarted", "the model, resources, SLO, workload or search space "
                           "changed: the study starts over (the promoted configuration serves meanwhile)")]

    @staticmethod
    def _last_failure(status: InferenceServiceStatus) -> str:
        failed = [h for h in status.history if h.result in ("RolledBack", "Failed")]
        return f"{failed[-1].reason}: {failed[-1].message}" if failed else "verification failed"

    def _disable(self, part: Part) -> None:
        """Tuning switched off: the study and its children go, the user's engine settings serve again."""
        if self.stored is not None:
            self.applier.delete("ConfigMap", study_name(self.name))
            self.changed = True
            self.actor.converge(ClusterState(study=self.stored.study), changed=True)
        part.fields["tuning"] = None
        part.conditions["Tuned"] = None

    def _report(self, state: ClusterState, part: Part) -> None:
        engine = engine_config(effective_spec(self.spec, state)).model_dump(mode="json", by_alias=True)
        part.fields["tuning"] = tuning_status(state, engine, study_name(self.name))
        if state.trial is not None:
            part.phase = "Tuning"  # shown while the rollout says Ready (reducer.PHASE_PRECEDENCE)

    def _condition(self, state: ClusterState, status: InferenceServiceStatus, desired: str, part: Part) -> None:
        if state.phase == "Done":
            if status.active_revision != desired:
                part.condition("Tuned", False, "Promoting", f"rolling out the best: {state.message}")
        elif state.phase == "Failed":
            part.condition("Tuned", False, "TuningFailed", state.message)
        elif state.trial is not None:
            n, total = sum(r.ran for r in state.study.records) + 1, self.spec.tuning.max_trials
            part.condition("Tuned", False, "Tuning", f"trial {n} of at most {total} ({state.phase})")


def trial_revision(status: InferenceServiceStatus) -> str | None:
    trial = status.tuning.current_trial if status.tuning is not None else None
    return trial.revision if trial is not None else None
