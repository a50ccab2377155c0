"""The operator's side of the tuner's study: spec -> settings and search space, the study's basis, the spec a
promotion serves, and the study -> status.tuning (the CRD's shape). The tuner's state machine
(tuner/cluster.py) stays pure and knows nothing of the operator's types."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kvpilot.operator.apply import Applier
from kvpilot.operator.engine_knobs import effective_knobs
from kvpilot.operator.spec import InferenceServiceSpec
from kvpilot.operator.status import TuningStatus
from kvpilot.tuner.cluster import ClusterSettings, ClusterState
from kvpilot.tuner.objective import SLO, RateSearchSettings, TrialOutcome
from kvpilot.tuner.space import SearchSpace, gpu_space
from kvpilot.tuner.study import Params, TunerStudy

STUDY_KEY = "study.json"
BASIS_KEY = "basis"


def study_name(name: str) -> str:
    """Both the study's ConfigMap and the trial Service are `<name>-tuning` (different kinds)."""
    return f"{name}-tuning"


def _searched(spec: InferenceServiceSpec) -> set[str]:
    return {k.name for k in space_from_spec(spec).knobs if k.searched}


def study_basis(spec: InferenceServiceSpec) -> str:
    """What the study's results are about: everything but the searched knobs, how tuning is paced, and what does not
    change one replica's engine (replicas, rollout, routers, monitoring)."""
    doc = spec.model_dump(mode="json", exclude={"replicas", "rollout", "router", "monitoring"})
    doc["engine"] = {k: v for k, v in doc["engine"].items() if k not in _searched(spec)}
    doc["tuning"] = {k: doc["tuning"][k] for k in ("search_space", "allow_quantization", "workload")}
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


def current_knobs(spec: InferenceServiceSpec) -> Params:
    engine = effective_knobs(spec.engine)
    return {k.name: engine[k.name] for k in space_from_spec(spec).knobs if k.name in engine}


def settings_from_spec(spec: InferenceServiceSpec, revision_prefix: str = "trial") -> ClusterSettings:
    """The tuner's ClusterSettings from spec.tuning, spec.slo and spec.rollout."""
    t = spec.tuning
    rate = t.workload.request_rate
    settings = RateSearchSettings()
    if rate.requests_per_second is not None:  # a fixed arrival rate: one step, no search
        settings = RateSearchSettings(start_rate=rate.requests_per_second, steps=1)
    elif rate.max_requests_per_second is not None:
        settings = RateSearchSettings(max_rate=rate.max_requests_per_second)
    return ClusterSettings(
        enabled=t.enabled, max_trials=t.max_trials, rate=settings,
        step_seconds=t.trial_duration_seconds / settings.steps,
        slo=SLO(ttft_p95_ms=spec.slo.ttft_p95_ms, itl_p95_ms=spec.slo.itl_p95_ms, min_throughput_tokens_per_second=
                _per_replica(spec.slo.min_throughput_tokens_per_second, spec.replicas)),
        ready_timeout_s=spec.rollout.ready_timeout_seconds, gpus=max(1, spec.resources.gpus_per_replica),
        retune_below_attainment=t.retune_below_attainment, revision_prefix=revision_prefix)


def _per_replica(service_floor: float | None, replicas: int) -> float | None:
    """minThroughputTokensPerSecond holds for the whole service; a trial measures one of its replicas."""
    return None if service_floor is None else service_floor / max(1, replicas)


def space_from_spec(spec: InferenceServiceSpec) -> SearchSpace:
    """Issue 6's GPU space for the replica's GPUs, narrowed by spec.tuning.searchSpace; precision knobs only
    with spec.tuning.allowQuantization."""
    overrides = spec.tuning.search_space.model_dump(exclude_none=True)
    space = gpu_space(max(1, spec.resources.gpus_per_replica), allow_quantization=spec.tuning.allow_quantization)
    return space.with_overrides(overrides)


def tuning_status(state: ClusterState, engine: dict[str, Any], study_config_map: str) -> TuningStatus:
    """status.tuning from the study; `engine` is the serving revision's engine config (camelCase), which
    supplies the knobs the study does not search."""
    study = TunerStudy(state.study)
    best = study.best()

    def summary(number: int, params: Params, result: TrialOutcome | None, revision: str | None) -> dict[str, Any]:
        config = {**engine, **_camel(params)}
        return {
            "number": number, "revision": revision, "config": config, "precision": precision(config),
            "feasible": result is None or result.status != "infeasible",
            "goodputTokensPerSecond": None if result is None else round(result.goodput_tokens_per_s, 2),
            "ttftP95Ms": None if result is None or result.ttft_p95_s is None else round(result.ttft_p95_s * 1000, 2),
            "itlP95Ms": None if result is None or result.itl_p95_s is None else round(result.itl_p95_s * 1000, 2),
        }

    phase = {"Idle": "Idle", "Deploying": "Running", "Loading": "Running", "Done": "Done", "Failed": "Failed"}
    return TuningStatus.model_validate({
        "studyConfigMap": study_config_map,
        "state": phase[state.phase] if state.study.records or state.trial else "Idle",
        "trialsRun": study.trials_run,
        "currentTrial": None if state.trial is None else summary(
            len(state.study.records), state.trial.params, None, state.trial.revision),
        "best": None if best is None else summary(best.number, best.params, best.outcome, best.note or None),
        "message": state.message or None,
    })


def precision(config: dict[str, Any]) -> str:
    """What a trial's engine computes in, from its camelCase config: `fp8 weights, fp8 KV cache`."""
    weights = config.get("quantization") or "checkpoint"
    kv = config.get("kvCacheDtype") or "auto"
    return f"{weights} weights, {'model-dtype' if kv == 'auto' else kv} KV cache"


def _camel(params: Params) -> dict[str, Any]:
    return {"".join(w if i == 0 else w.capitalize() for i, w in enumerate(k.split("_"))): v for k, v in params.items()}
