"""Observe: what a tuning pass needs to know, read into the tuner's `Observation`.

The trial revision's Deployment and Pods and the load step's Job and Pod come from the watch-fed indexes
(through the Applier's view); the step's window, the trial's first scrape and the live attainment come from
Prometheus through tuner/metrics.py. Nothing here writes.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from kvpilot.operator import resources as res
from kvpilot.operator.apply import Applier
from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.load_job import finished, job_name, load_result, num_prompts, terminated
from kvpilot.operator.policy import prometheus_url
from kvpilot.operator.spec import InferenceServiceSpec
from kvpilot.operator.status import InferenceServiceStatus
from kvpilot.tuner.cluster import ClusterSettings, ClusterState, Observation
from kvpilot.tuner.metrics import ITL, TTFT, Prometheus, PrometheusError, PrometheusReader, WindowMetrics, attainment

log = logging.getLogger(__name__)
# Container states after which a trial revision will not come up by waiting longer.
FATAL_WAITING = {
    "CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError", "InvalidImageName"
}
MAX_RESTARTS = 2
WARMUP_SHARE, MAX_WARMUP_S = 0.25, 30.0
POD_STATUS_GRACE_S = 30.0  # after a step's planned end, a finished Job's pod may still be on its way


class TrialObserver:
    """Reads one InferenceService's trial, load step and live revision; `get` remembers this pass's reads."""

    def __init__(self, applier: Applier, name: str, spec: InferenceServiceSpec, config: OperatorConfig) -> None:
        self.applier, self.name, self.spec, self.config = applier, name, spec, config
        self.prometheus = prometheus_url(spec, config)
        self.seen: dict[str, dict[str, Any] | None] = {}

    # -- observing --------------------------------------------------------------------------------------

    def observe(self, state: ClusterState, s: ClusterSettings, status: InferenceServiceStatus,
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
        job = self.get("Job", job_name(self.name, trial.revision, len(trial.steps)))
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

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        key = f"{kind}/{name}"
        if key not in self.seen:
            self.seen[key] = self.applier.get(kind, name)
        return self.seen[key]

    def _candidate(self, revision: str, scraped: bool) -> tuple[str, str]:
        """absent / pending / failed / ready — and, with `scraped`, seen by Prometheus: a load step's window
        before the first scrape would read nothing."""
        deployment = self.get("Deployment", res.deployment_name(self.name, revision))
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

