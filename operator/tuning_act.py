"""Act: carry out what the study decided, and say it.

Save the study in its ConfigMap, make the trial in flight's children exist (its revision, the `<name>-tuning`
Service, the load step's Job) and remove a finished trial's, all as server-side applies through the Applier;
and word the study's actions as Events.
"""

from __future__ import annotations

from typing import Any

from kvpilot.operator import resources as res
from kvpilot.operator.apply import Applier
from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.load_job import job_labels, job_name, load_job
from kvpilot.operator.reducer import Event
from kvpilot.operator.spec import InferenceServiceSpec
from kvpilot.operator.tuning_study import (
    BASIS_KEY,
    STUDY_KEY,
    effective_spec,
    settings_from_spec,
    study_basis,
    study_name,
    with_params,
)
from kvpilot.tuner.cluster import ClusterState, DeleteCandidate, DeployCandidate, Promote
from kvpilot.tuner.study import Params


class TrialActor:
    def __init__(self, applier: Applier, name: str, spec: InferenceServiceSpec, config: OperatorConfig,
                 stored: ClusterState | None, stored_basis: str | None, get: Any) -> None:
        self.applier, self.name, self.spec, self.config = applier, name, spec, config
        self.stored, self.stored_basis, self._get = stored, stored_basis, get

    @staticmethod
    def describe(state: ClusterState, actions: list[Any]) -> list[Event]:
        events = []
        records = state.study.records
        for action in actions:
            if isinstance(action, DeployCandidate):
                events.append(Event("Normal", "TrialStarted", f"{action.revision}: {_knobs(action.engine)}"))
            elif isinstance(action, DeleteCandidate):
                finished = [r for r in records if r.ran and r.note == action.revision]
                if finished:
                    o = finished[-1].outcome
                    events.append(Event("Normal", "TrialFinished", f"{action.revision}: {o.status}, "
                                        f"{o.goodput_per_gpu:.0f} tok/s per GPU{f' ({o.reason})' if o.reason else ''}"))
            elif isinstance(action, Promote):
                events.append(Event("Normal", "TuningPromoted", f"promoting {_knobs(action.engine)}: {state.message}"))
        if state.phase == "Failed" and not any(isinstance(a, Promote) for a in actions) and actions:
            events.append(Event("Warning", "TuningFailed", state.message))
        return events

    def save(self, state: ClusterState) -> None:
        data = {STUDY_KEY: state.model_dump_json(), BASIS_KEY: study_basis(self.spec)}
        if self.stored is not None and data == {STUDY_KEY: self.stored.model_dump_json(), BASIS_KEY: self.stored_basis}:
            return
        labels = {**res.base_labels(self.name), "kvpilot.dev/role": "tuning-study"}
        self.applier.ensure({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": study_name(self.name), "namespace": self.applier.namespace, "labels": labels}, "data": data})

    def converge(self, state: ClusterState, changed: bool) -> None:
        """Children of the trial in flight exist; a finished trial's Service and Jobs go (its Deployment goes
        with the revisions the reconciler no longer keeps). Objects this pass already read and found are not
        read again: the API server is asked only where something may be missing, or the study moved on."""
        trial, ns = state.trial, self.applier.namespace
        current_job = None
        if trial is not None:
            if changed or self._get("Deployment", res.deployment_name(self.name, trial.revision)) is None:
                spec = with_params(effective_spec(self.spec, state), trial.params).model_copy(update={"replicas": 1})
                for child in [*res.revision_children(self.name, ns, spec, trial.revision),
                              res.service(self.name, ns, study_name(self.name), trial.revision, "tuning")]:
                    self.applier.ensure(child)
            if state.phase == "Loading" and trial.rate is not None:
                step = len(trial.steps)
                current_job = job_name(self.name, trial.revision, step)
                if changed or self._get("Job", current_job) is None:
                    url = self.config.service_url(study_name(self.name), ns, res.PORT)
                    self.applier.ensure(load_job(self.name, ns, self.spec, trial.revision, step, trial.rate,
                                                 settings_from_spec(self.spec).step_seconds, url))
        if trial is None and (changed or self._get("Service", study_name(self.name)) is not None):
            self.applier.delete("Service", study_name(self.name))
        for job in self.applier.list("Job", job_labels(self.name)):
            if job["metadata"]["name"] != current_job:
                self.applier.delete("Job", job["metadata"]["name"])



def _knobs(params: Params) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
