"""One reconciliation pass for one InferenceService: read, step the rollout, converge children, write status.

Handlers call `reconcile()`; it reads the object fresh (never trusts a possibly stale watch body),
so two passes in a row — or a pass after a restart — see the same truth.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any

from kvpilot.operator import policy, rollout
from kvpilot.operator import resources as res
from kvpilot.operator.apply import Applier, conflict_error
from kvpilot.operator.autoscale import Reading, autoscaling_part
from kvpilot.operator.autoscale_signal import read_signals
from kvpilot.operator.children import Children
from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.kube import INFERENCE_SERVICE, SECRET, SERVICE_MONITOR, ApiError, KubeClient
from kvpilot.operator.reducer import Event, Part, apply, reduce
from kvpilot.operator.router_resources import router_children, router_name, tokenizer_source
from kvpilot.operator.router_status import ready_routers, router_part
from kvpilot.operator.spec import InferenceServiceSpec, parse_spec
from kvpilot.operator.status import InferenceServiceStatus, dump_status, load_status, now
from kvpilot.operator.tuning import TuningDriver, trial_revision
from kvpilot.operator.tuning_study import effective_spec, load_study
from kvpilot.operator.verify import CheckResult, judge_slo, read_slo_window, smoke_completion
from kvpilot.tuner.metrics import PrometheusError
from pydantic import ValidationError

log = logging.getLogger(__name__)
Emit = Callable[[Event], None]


def spec_error_message(exc: ValidationError) -> str:
    """One line per problem, with the CRD field path, e.g. `engine.gpuMemoryUtilization: ...`."""
    parts = []
    for error in exc.errors():
        path = ".".join(str(p) for p in error["loc"]) or "spec"
        parts.append(f"spec.{path}: {error['msg']}")
    return "; ".join(parts)


class LiveChecks:
    """Observations for the state machine, read from the cluster and the preview Service."""

    def __init__(self, applier: Applier, spec: InferenceServiceSpec, name: str, config: OperatorConfig,
                 scaling_up: str | None = None) -> None:
        self.applier, self.spec, self.name, self.config = applier, spec, name, config
        self.scaling_up = scaling_up  # the revision the autoscaler added replicas to within their ready timeout

    def ready(self, revision: str) -> bool:
        """Every replica ready; while the autoscaler's new replicas start (within readyTimeoutSeconds), one is
        enough: a scale-up is not a fault, and past that timeout the missing replicas are Degraded again."""
        deployment = self.applier.get("Deployment", res.deployment_name(self.name, revision))
        if revision == self.scaling_up and ((deployment or {}).get("status") or {}).get("readyReplicas"):
            return True
        return res.deployment_ready(deployment)

    def smoke(self) -> CheckResult:
        url = self.config.service_url(res.preview_service_name(self.name), self.applier.namespace, res.PORT)
        return smoke_completion(url, self.spec, self._api_key())

    def slo_window(self, revision: str, seconds: float) -> CheckResult | None:
        prom = policy.prometheus(self.spec, self.config)
        if prom is None:
            return None
        labels = res.series_labels(self.applier.namespace, self.name, revision)
        try:
            observation = read_slo_window(prom, labels, revision, seconds)
        except PrometheusError as exc:
            return CheckResult(ok=False, reason="PrometheusUnavailable", message=str(exc))
        return judge_slo(observation, self.spec.slo, check_throughput=False)

    def _api_key(self) -> str | None:
        secret_name = self.spec.engine.api_key_secret
        if secret_name is None:
            return None
        secret = self.applier.client.get(SECRET, self.applier.namespace, secret_name)
        value = ((secret or {}).get("data") or {}).get("api-key")
        return base64.b64decode(value).decode() if value else None


def _revision_spec(
    applier: Applier, name: str, revision: str, current: InferenceServiceSpec
) -> InferenceServiceSpec | None:
    """The spec a non-desired revision was built from, kept in its ConfigMap, so drift on it can be repaired."""
    config_map = applier.get("ConfigMap", res.deployment_name(name, revision))
    if config_map is None:
        return None
    snapshot = json.loads(config_map["data"][res.SPEC_KEY])
    return InferenceServiceSpec.model_validate({**snapshot, "replicas": current.replicas})


def _converge(
    applier: Applier,
    name: str,
    spec: InferenceServiceSpec,
    desired: str,
    status: InferenceServiceStatus,
    service_monitors: bool,
    router_image: str,
) -> None:
    keep = rollout.revisions_to_keep(status)
    skip = {r.revision for r in status.retiring} | {trial_revision(status)}  # a trial's children are the tuner's
    for revision in sorted(keep - skip):
        revision_spec = spec if revision == desired else _revision_spec(applier, name, revision, spec)
        if revision_spec is None:
            log.warning("revision %s of %s has no ConfigMap; cannot repair it", revision, name)
            continue
        for child in res.revision_children(name, applier.namespace, revision_spec, revision):
            applier.ensure(child)
    serving = status.active_revision or desired
    preview = status.candidate_revision or serving
    for child in res.shared_children(name, applier.namespace, preview, service_monitors):
        applier.ensure(child)
    routers_up = ready_routers(applier.get("Deployment", router_name(name))) > 0
    direct = None if routers_up else status.active_revision
    for child in router_children(name, applier.namespace, spec, serving, router_image, direct):
        applier.ensure(child)
    for kind in ("Deployment", "ConfigMap"):
        for obj in applier.list(kind, res.pod_selector(name)):
            revision = obj["metadata"].get("labels", {}).get(res.LABEL_REVISION)
            if revision is not None and revision not in keep:
                applier.delete(kind, obj["metadata"]["name"])


def _observe_slo(
    previous: InferenceServiceStatus, namespace: str, name: str, active: str | None, spec: InferenceServiceSpec,
    config: OperatorConfig, at: dt.datetime,
) -> Part:
    """Read the live revision's SLO window every slo_refresh_seconds; skipped without a prometheusUrl."""
    part = Part()
    prom = policy.prometheus(spec, config)
    if prom is None or active is None:
        part.condition("SLOMet", None, "NotMeasured", "no Prometheus: the operator's, or spec.monitoring.prometheusUrl")
        return part
    last = previous.slo
    fresh = last is not None and (at - last.observed_at).total_seconds() < config.slo_refresh_seconds
    if fresh and last is not None and last.revision == active:
        return part
    labels = res.series_labels(namespace, name, active)
    try:
        observation = read_slo_window(prom, labels, active, config.slo_window_seconds)
    except PrometheusError as exc:
        part.condition("SLOMet", None, "PrometheusUnavailable", str(exc))
        return part
    part.fields.update(slo=observation, ttft_p95_ms=observation.ttft_p95_ms,
                       tokens_per_second=observation.tokens_per_second)
    verdict = judge_slo(observation, spec.slo, check_throughput=True)
    if verdict is None:
        part.condition("SLOMet", None, "NoData", "no SLO declared or no samples in the window")
    else:
        part.condition("SLOMet", verdict.ok, verdict.reason, verdict.message)
    return part


def _autoscale(applier: Applier, previous: InferenceServiceStatus, name: str, spec: InferenceServiceSpec,
               config: OperatorConfig, at: dt.datetime) -> Part:
    """Read the signals at most every autoscale_refresh_seconds and propose the active revision's replicas."""
    auto = spec.autoscaling
    assert auto is not None
    last = previous.autoscaling
    active = previous.active_revision
    deployment = applier.get("Deployment", res.deployment_name(name, active)) if active else None
    serving = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)
    if last is not None and last.recommendations and (
            at - last.recommendations[-1].at).total_seconds() < config.autoscale_refresh_seconds:
        part = Part()
        part.fields["autoscaling"] = last.model_copy(update={"current_replicas": serving})
        return part
    prom = policy.prometheus(spec, config)
    reading = (Reading(error="no Prometheus: the operator's, or spec.monitoring.prometheusUrl") if prom is None
               else read_signals(prom, applier.namespace, name, active, spec, auto.window_seconds))
    best = previous.tuning.best if previous.tuning else None
    goodput = auto.goodput_per_replica or (best.goodput_tokens_per_second if best and best.feasible else None)
    current = last.desired_replicas if last is not None else spec.replicas
    return autoscaling_part(auto, last, reading, current, serving, goodput, at)


def _scaled_replicas(previous: InferenceServiceStatus, part: Part) -> int:
    """What the revisions get: the autoscaler's count, but at least one until a revision serves and while a
    rollout's candidate must be verified (the candidate comes up at the stable revision's count)."""
    desired = part.fields["autoscaling"].desired_replicas
    if previous.active_revision is None or previous.candidate_revision is not None:
        return max(1, desired)
    return desired


def _scaling_up(previous: InferenceServiceStatus, part: Part | None, spec: InferenceServiceSpec,
                at: dt.datetime) -> str | None:
    """The active revision, while the autoscaler's last change was an increase made less than readyTimeoutSeconds
    ago and it still wants more replicas than are ready."""
    auto = part.fields.get("autoscaling") if part else None
    if auto is None or auto.last_scale_time is None or previous.active_revision is None:
        return None
    recent = (at - auto.last_scale_time).total_seconds() < spec.rollout.ready_timeout_seconds
    return previous.active_revision if recent and auto.desired_replicas > auto.current_replicas else None


def _invalid_spec(status: InferenceServiceStatus, message: str, reason: str = "InvalidSpec") -> Part:
    part = Part(phase="Failed" if status.active_revision is None else "Degraded")
    previous = status.condition("Ready")
    if previous is None or (previous.reason, previous.message) != (reason, message):
        part.events.append(Event("Warning", reason, message))  # once per distinct problem
    part.condition("Ready", False, reason, message)
    return part


def _policy_violations(client: KubeClient, namespace: str, spec: InferenceServiceSpec,
                       config: OperatorConfig) -> list[str]:
    problems = policy.violations(spec, config)
    if spec.engine.api_key_secret and config.read_secrets:
        secret = client.get(SECRET, namespace, spec.engine.api_key_secret)
        problems += [p for p in [policy.secret_violation(spec.engine.api_key_secret, secret)] if p]
    return problems


def _write_status(client: KubeClient, body: dict[str, Any], status: InferenceServiceStatus) -> bool:
    """Apply our part of status, only when it changed (a quiet pass writes nothing). Server-side apply: a
    field we no longer set (a finished rollout) is removed, not left behind."""
    new = dump_status(status)
    old = dump_status(load_status(body.get("status")))  # ours only: keys others write are not compared
    if new == old:
        return False
    meta = body["metadata"]
    manifest = {"apiVersion": INFERENCE_SERVICE.api_version, "kind": INFERENCE_SERVICE.kind,
                "metadata": {"name": meta["name"], "namespace": meta["namespace"]}, "status": new}
    try:
        client.apply(manifest, force=True, subresource="status")
    except ApiError as exc:
        if exc.status == 409:
            raise conflict_error(f"InferenceService/{meta['name']} status", exc) from exc
        raise
    return True


def reconcile(client: KubeClient, namespace: str, name: str, config: OperatorConfig, emit: Emit,
              indexes: dict[str, Any]) -> None:
    """One pass; `indexes` are kopf's indexes of the children (children.py)."""
    body = client.get(INFERENCE_SERVICE, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return  # gone: its children go with it through their ownerReferences
    generation = body["metadata"].get("generation")
    previous = load_status(body.get("status"))
    at = now()
    try:
        spec = user_spec = parse_spec(body.get("spec") or {})
    except ValidationError as exc:
        status, events = reduce(previous, {"spec": _invalid_spec(previous, spec_error_message(exc))}, generation)
        _finish(client, body, status, events, emit)
        return
    problems = _policy_violations(client, namespace, spec, config)
    if problems:  # what the operator's configuration does not allow: nothing is created or changed
        part = _invalid_spec(previous, "; ".join(problems), "PolicyViolation")
        status, events = reduce(previous, {"spec": part}, generation)
        _finish(client, body, status, events, emit)
        return
    applier = Applier(client, body, Children(indexes, namespace, name), emit)
    study, basis = load_study(applier, name)
    spec = effective_spec(spec, study)
    desired = res.revision_of(spec)
    parts: dict[str, Part] = {}
    if spec.autoscaling is not None:
        parts["autoscaling"] = _autoscale(applier, previous, name, spec, config, at)
        spec = spec.model_copy(update={"replicas": _scaled_replicas(previous, parts["autoscaling"])})
    elif previous.autoscaling is not None:  # turned off: spec.replicas serves again, and status says no more
        parts["autoscaling"] = Part(fields={"autoscaling": None})
    checks = LiveChecks(applier, spec, name, config, _scaling_up(previous, parts.get("autoscaling"), spec, at))
    slo_checks = policy.prometheus_url(spec, config) is not None
    parts["rollout"] = rollout.advance(previous, spec, desired, checks, at, slo_checks)
    after_rollout = apply(previous, parts, generation)  # what tuning and the children follow
    tuning = TuningDriver(applier, name, body["metadata"].get("uid", name), user_spec, config, study, basis)
    parts["tuning"] = tuning.step(after_rollout, desired, at)
    service_monitors = spec.monitoring.service_monitor and client.has_resource(SERVICE_MONITOR)
    _converge(applier, name, spec, desired, apply(previous, parts, generation), service_monitors, config.router_image)
    parts["slo"] = _observe_slo(previous, namespace, name, after_rollout.active_revision, spec, config, at)
    parts["router"] = router_part(applier.get("Deployment", router_name(name)), after_rollout.active_revision,
                                  tokenizer_source(spec)[0])
    deployment = applier.get("Deployment", res.deployment_name(name, after_rollout.active_revision or desired))
    parts["rollout"].fields["ready_replicas"] = ((deployment or {}).get("status") or {}).get("readyReplicas", 0)
    status, events = reduce(previous, parts, generation)
    _finish(client, body, status, events, emit)


def _finish(client: KubeClient, body: dict[str, Any], status: InferenceServiceStatus, events: list[Event],
            emit: Emit) -> None:
    """Status first, then the Events: an Event never announces what status does not yet say."""
    _write_status(client, body, status)
    for event in events:
        emit(event)
