"""Drives one InferenceService's tuning study (kvpilot.tuner.cluster) a step per reconcile pass.

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
import json
import logging
from typing import Any

from kvpilot.operator import resources as res
from kvpilot.operator.apply import Applier
from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.engine_knobs import effective_knobs
from kvpilot.operator.load_job import (
    finished,
    job_labels,
    job_name,
    load_job,
    load_result,
    num_prompts,
    terminated,
)
from kvpilot.operator.policy import prometheus_url
from kvpilot.operator.reducer import Event, Part
from kvpilot.operator.rollout import engine_config
from kvpilot.operator.spec import InferenceServiceSpec
from kvpilot.operator.status import InferenceServiceStatus, TuningStatus
from kvpilot.tuner.cluster import (
    ClusterSettings,
    ClusterState,
    DeleteCandidate,
    DeployCandidate,
    Observation,
    Promote,
    advance,
    settings_from_spec,
    space_from_spec,
    tuning_status,
)
from kvpilot.tuner.metrics import (
    ITL,
    TTFT,
    Prometheus,
    PrometheusError,
    PrometheusReader,
    WindowMetrics,
    attainment,
)
from kvpilot.tuner.study import Params, StudyState

log = logging.getLogger(__name__)
STUDY_KEY = "study.json"
BASIS_KEY = "basis"
# Container states after which a trial revision will not come up by waiting longer.
FATAL_WAITING = {
    "CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError", "InvalidImageName"
}
MAX_RESTARTS = 2
WARMUP_SHARE, MAX_WARMUP_S = 0.25, 30.0
POD_STATUS_GRACE_S = 30.0  # after a step's planned end, a finished Job's pod may still be on its way


def study_name(name: str) -> str:
    """Both the study's ConfigMap and the trial Service are `<name>-tuning` (different kinds)."""
    return f"{name}-tuning"


def _searched(spec: InferenceServiceSpec) -> set[str]:
    return {k.name for k in space_from_spec(spec).knobs if k.searched}


def study_basis(spec: InferenceServiceSpec) -> str:
    """What the study's results are about: everything but the searched knobs and how tuning is paced."""
    doc = spec.model_dump(mode="json", exclude={"replicas", "rollout", "monitoring"})
    doc["engine"] = {k: v for k, v in doc["engine"].items() if k not in _searched(spec)}
    doc["tuning"] = {k: doc["tuning"][k] for k in ("search_space", "workload")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def with_params(spec: InferenceServiceSpec, params: Params) -> InferenceServiceSpec:
    engine = spec.engine.model_copy(update={k: v for k, v in params.items() if k in type(spec.engine).model_fields})
    return spec.model_copy(update={"engine": engine})


def load_study(applier: Applier, name: str) -> tuple[ClusterState | None, str | None]:
    config_map = applier.get("ConfigMap", study_name(name))
    if config_map is None:
        return None, None
    data = config_map.get("data") or {}
    return ClusterState.model_validate_json(data[STUDY_KEY]), data.get(BASIS_KEY)


def effective_spec(spec: InferenceServiceSpec, state: ClusterState | None) -> InferenceServiceSpec:
    """The spec the rollout serves: the user's, with the study's promoted knobs while tuning is enabled."""
    if not spec.tuning.enabled or state is None or state.promoted is None:
        return spec
    return with_params(spec, state.promoted)


def _current(spec: InferenceServiceSpec) -> Params:
    engine = effective_knobs(spec.engine)
    return {k.name: engine[k.name] for k in space_from_spec(spec).knobs if k.name in engine}


class TuningDriver:
    """One pass of the study for one InferenceService; the reconciler calls `step` after the rollout's."""

    def __init__(self, applier: Applier, name: str, uid: str, spec: InferenceServiceSpec, config: OperatorConfig,
                 state: ClusterState | None, basis: str | None) -> None:
        self.applier, self.name, self.spec, self.config = applier, name, spec, config
        self.stored, self.stored_basis = state, basis
        self.prefix = f"trial-{hashlib.sha256(uid.encode()).hexdigest()[:6]}"
        self.prometheus = prometheus_url(spec, config)
        self.seen: dict[str, dict[str, Any] | None] = {}  # objects this pass already read, by kind/name
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
            update={"baseline": _current(effective_spec(self.spec, state))})
        if state.promoted is not None and status.failed_revision == desired:
            state.phase, state.promoted = "Failed", None
            state.message = f"the rollout of the best configuration was rolled back: {self._last_failure(status)}"
            part.events.append(Event("Warning", "TuningPromotionRolledBack", state.message))
        advanced = False
        if self.prometheus is None:
            part.condition("Tuned", False, "PrometheusRequired", "tuning reads trial metrics from Prometheus: the "
                           "operator's (--prometheus-url), or spec.monitoring.prometheusUrl")
        elif status.active_revision is None or status.rollout is not None or status.phase != "Ready":
            if state.phase != "Done":
                part.condition("Tuned", False, "Waiting", "tuning waits for the service to be Ready with no "
                               "rollout in progress")
        else:
            state, actions = advance(state, settings, self._observe(state, settings, status, at))
            part.events += self._describe(state, actions)
            self.changed, advanced = bool(actions), True
        target = res.revision_of(effective_spec(self.spec, state))  # what serves once the study's best is live
        if advanced:
            self._condition(state, status, target, part)
        if state.phase == "Done" and status.active_revision == target:
            part.condition("Tuned", True, "BestPromoted", state.message)
        if self.stored is not None and state != self.stored:
            self.changed = True
        self._save(state)
        self._converge(state)
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

    # -- observing --------------------------------------------------------------------------------------

    def _observe(self, state: ClusterState, s: ClusterSettings, status: InferenceServiceStatus,
                 at: dt.datetime) -> Observation:
        obs = Observation(now=at)
        trial = state.trial
        if trial is None:
            if state.phase in ("Done", "Failed") and s.retune_below_attainment is not None and status.active_revision:
                obs.live_attainment = self._attainment(status.active_revision)
            return obs
        loading = state.phase == "Loading" and trial.rate is not None
        obs.candidate, obs.candidate_message = self._candidate(trial.revision, scraped=not loading)
        if not loading:
            return obs
        assert trial.rate is not None
        job = self._get("Job", job_name(self.name, trial.revision, len(trial.steps)))
        if job is None or finished(job) is None:
            return obs
        pods = self.applier.list("Pod", {"job-name": job["metadata"]["name"]})
        if not terminated(pods) and (at - trial.since).total_seconds() < s.step_seconds + POD_STATUS_GRACE_S:
            return obs  # the Job's and its pod's watch events arrive apart: wait for the pod's last status
        planned = num_prompts(trial.rate, s.step_seconds)
        result = load_result(job, pods, planned)
        if result is None:
            return obs
        if result.started_at is None:  # the client never ran: the step measured nothing
            obs.window = WindowMetrics(seconds=s.step_seconds, output_tokens=0, source=f"none: {result.message}")
        else:
            warmup = min(MAX_WARMUP_S, WARMUP_SHARE * s.step_seconds)
            t0, t1 = result.started_at + warmup, result.started_at + s.step_seconds
            if at.timestamp() < t1 + 1.1 * self.config.scrape_interval_seconds + 0.25:
                return obs  # the window's last scrape is not in Prometheus yet
            try:
                obs.window = self._reader(trial.revision).window(t0, t1)
            except Exception as exc:  # prometheus-api-client raises several unrelated types
                log.warning("%s: cannot read trial metrics yet: %r", self.name, exc)
                return obs
        obs.load_done = True
        obs.requests_ok, obs.requests_failed, obs.failures = result.completed, result.failed, result.failures
        return obs

    def _reader(self, revision: str) -> PrometheusReader:
        assert self.prometheus is not None
        return PrometheusReader(self.prometheus, self._labels(revision), self.config.scrape_interval_seconds,
                                self.config.prometheus_ca_bundle)

    def _get(self, kind: str, name: str) -> dict[str, Any] | None:
        key = f"{kind}/{name}"
        if key not in self.seen:
            self.seen[key] = self.applier.get(kind, name)
        return self.seen[key]

    def _candidate(self, revision: str, scraped: bool) -> tuple[str, str]:
        """absent / pending / failed / ready — and, with `scraped`, seen by Prometheus: a load step's window
        before the first scrape would read nothing."""
        deployment = self._get("Deployment", res.deployment_name(self.name, revision))
        if deployment is None:
            return "absent", ""
        if res.deployment_ready(deployment) and not scraped:
            return "ready", ""
        pods = self.applier.list("Pod", res.pod_selector(self.name, revision))
        for pod in pods:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in FATAL_WAITING or cs.get("restartCount", 0) > MAX_RESTARTS:
                    why = waiting.get("reason") or f"{cs.get('restartCount')} restarts"
                    last = ((cs.get("lastState") or {}).get("terminated") or {}).get("reason")
                    return "failed", f"pod {pod['metadata']['name']}: {why}" + (f" (last exit: {last})" if last else "")
        if not res.deployment_ready(deployment):
            return "pending", ""
        try:
            self._reader(revision).wait_for_series(timeout_s=0.0)
        except TimeoutError:
            return "pending", "ready; waiting for Prometheus to scrape it"
        except Exception as exc:  # Prometheus unreachable: wait rather than judge the trial
            return "pending", f"Prometheus: {exc!r}"[:200]
        return "ready", ""

    def _attainment(self, revision: str) -> float | None:
        """Share of the live revision's requests within the SLO (the worse of TTFT and ITL) over the SLO window."""
        assert self.prometheus is not None
        slo = self.spec.slo
        targets = {TTFT: slo.ttft_p95_ms and slo.ttft_p95_ms / 1000, ITL: slo.itl_p95_ms and slo.itl_p95_ms / 1000}
        try:
            return attainment(Prometheus(self.prometheus, self.config.prometheus_ca_bundle), self._labels(revision),
                              targets,
                              self.config.slo_window_seconds)
        except PrometheusError as exc:  # no reading is no reason to re-tune
            log.warning("%s: attainment not readable: %s", self.name, exc)
            return None

    def _labels(self, revision: str) -> dict[str, str]:
        return res.series_labels(self.applier.namespace, self.name, revision)

    # -- acting -----------------------------------------------------------------------------------------

    def _describe(self, state: ClusterState, actions: list[Any]) -> list[Event]:
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

    def _save(self, state: ClusterState) -> None:
        data = {STUDY_KEY: state.model_dump_json(), BASIS_KEY: study_basis(self.spec)}
        if self.stored is not None and data == {STUDY_KEY: self.stored.model_dump_json(), BASIS_KEY: self.stored_basis}:
            return
        labels = {**res.base_labels(self.name), "kvpilot.dev/role": "tuning-study"}
        self.applier.ensure({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": study_name(self.name), "namespace": self.applier.namespace, "labels": labels}, "data": data})

    def _converge(self, state: ClusterState) -> None:
        """Children of the trial in flight exist; a finished trial's Service and Jobs go (its Deployment goes
        with the revisions the reconciler no longer keeps). Objects this pass already read and found are not
        read again: the API server is asked only where something may be missing, or the study moved on."""
        trial, ns = state.trial, self.applier.namespace
        current_job = None
        if trial is not None:
            if self.changed or self._get("Deployment", res.deployment_name(self.name, trial.revision)) is None:
                spec = with_params(effective_spec(self.spec, state), trial.params).model_copy(update={"replicas": 1})
                for child in [*res.revision_children(self.name, ns, spec, trial.revision),
                              res.service(self.name, ns, study_name(self.name), trial.revision, "tuning")]:
                    self.applier.ensure(child)
            if state.phase == "Loading" and trial.rate is not None:
                step = len(trial.steps)
                current_job = job_name(self.name, trial.revision, step)
                if self.changed or self._get("Job", current_job) is None:
                    url = self.config.service_url(study_name(self.name), ns, res.PORT)
                    self.applier.ensure(load_job(self.name, ns, self.spec, trial.revision, step, trial.rate,
                                                 settings_from_spec(self.spec).step_seconds, url))
        if trial is None and (self.changed or self._get("Service", study_name(self.name)) is not None):
            self.applier.delete("Service", study_name(self.name))
        for job in self.applier.list("Job", job_labels(self.name)):
            if job["metadata"]["name"] != current_job:
                self.applier.delete("Job", job["metadata"]["name"])

    def _disable(self, part: Part) -> None:
        """Tuning switched off: the study and its children go, the user's engine settings serve again."""
        if self.stored is not None:
            self.applier.delete("ConfigMap", study_name(self.name))
            self.changed = True
            self._converge(ClusterState(study=self.stored.study))
        part.fields["tuning"] = None
        part.conditions["Tuned"] = None

    def _report(self, state: ClusterState, part: Part) -> None:
        engine = engine_config(effective_spec(self.spec, state)).model_dump(mode="json", by_alias=True)
        part.fields["tuning"] = TuningStatus.model_validate(
            {**tuning_status(state, engine), "studyConfigMap": study_name(self.name)})
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


def _knobs(params: Params) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()))


def trial_revision(status: InferenceServiceStatus) -> str | None:
    trial = status.tuning.current_trial if status.tuning is not None else None
    return trial.revision if trial is not None else None
