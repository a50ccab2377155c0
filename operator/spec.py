"""InferenceService spec: the single source of truth for the CRD schema and the operator's parsing.

Field names are the CRD's (camelCase); Python attributes are snake_case. Descriptions become the
CRD's `kubectl explain` text, so they speak to the user.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from kvpilot.operator.engine_knobs import knobs_model
from kvpilot.operator.router_knobs import router_knobs_model
from kvpilot.tuner.objective import SLO
from kvpilot.tuner.space import gpu_space
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kvpilot.dev"
VERSION = "v1alpha1"
KIND = "InferenceService"
PLURAL = "inferenceservices"
SINGULAR = "inferenceservice"
SHORT_NAMES = ["kvis"]

# pvc://claim[/sub/path], hostpath:///absolute/path, an absolute directory inside the image, or `demo`.
MODEL_URI_PATTERN = r"^(demo|pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?|hostpath:///.+|/.+)$"


class CRDModel(BaseModel):
    """Base: camelCase on the wire, unknown fields rejected (a typo is an error, not a silent no-op)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def _preserve(kind: str) -> dict[str, Any]:
    """Schema for a field that carries a Kubernetes core type verbatim (tolerations, affinity)."""
    return {"type": kind, "x-kubernetes-preserve-unknown-fields": True}


class ModelSpec(CRDModel):
    name: str = Field(
        min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        description="Name clients send as `model`: letters, digits and . _ : / -, not starting with a sign.",
    )
    uri: str = Field(
        pattern=MODEL_URI_PATTERN,
        description="Where the weights live: pvc://claim/path, hostpath:///dir, an absolute directory "
        "inside the image, or `demo` for the embedded demo model.",
    )
    revision: str = Field(
        default="main",
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="Model revision label; changing it starts a blue-green rollout.",
    )


class _EngineSpecBase(CRDModel):
    """What the operator adds around the engine's knobs (those come from EngineConfig: engine_knobs.py)."""

    image: str = Field(default="ghcr.io/kvpilot/kvpilot-engine:0.1.0", min_length=1)
    drain_timeout_seconds: int = Field(
        default=30, ge=0, le=3600, description="In-flight requests get this long to finish on SIGTERM."
    )
    api_key_secret: str | None = Field(
        default=None, description="Name of a Secret whose `api-key` entry becomes KVPILOT_API_KEY."
    )
    extra_args: list[str] = Field(default_factory=list, description="Appended to `kvpilot serve`.")


EngineSpec = knobs_model(
    "EngineSpec", _EngineSpecBase, "The engine's image and server settings, and every EngineConfig knob (unset: "
    "the engine's default)."
)


def _quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not re.fullmatch(r"[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?", value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi)")
    return value


QUANTITY = {"x-kubernetes-int-or-string": True}


class ResourcesSpec(CRDModel):
    gpus_per_replica: int = Field(default=1, ge=0, le=16, description="0 runs on CPU.")
    cpu: int | str = Field(default="4", json_schema_extra=QUANTITY)
    memory: int | str = Field(default="32Gi", json_schema_extra=QUANTITY)
    shm_size: str = Field(default="8Gi", description="Size of the memory-backed /dev/shm.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list, json_schema_extra={"items": _preserve("object")})
    affinity: dict[str, Any] | None = Field(default=None, json_schema_extra=_preserve("object"))

    _quantities = field_validator("cpu", "memory")(lambda value: _quantity(value))


class SLOSpec(SLO):
    """The tuner's SLO model (one model and one judge for trials, verification and the live reading), camelCased."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class LengthDistribution(CRDModel):
    """Token counts of a synthetic workload; `fixed` uses mean only."""

    kind: Literal["fixed", "uniform", "normal"] = "uniform"
    mean: int = Field(default=512, ge=1)
    min: int | None = Field(default=None, ge=1)
    max: int | None = Field(default=None, ge=1)
    stddev: float | None = Field(default=None, ge=0)


class RequestRatePattern(CRDModel):
    kind: Literal["poisson", "constant", "ramp"] = "poisson"
    requests_per_second: float | None = Field(
        default=None, gt=0, description="Fixed arrival rate; unset lets each trial search the rate."
    )
    max_requests_per_second: float | None = Field(default=None, gt=0)


class WorkloadSpec(CRDModel):
    input_tokens: LengthDistribution = Field(default_factory=LengthDistribution)
    output_tokens: LengthDistribution = Field(default=LengthDistribution(mean=128))
    shared_prefix_ratio: float = Field(default=0.0, ge=0, le=1)
    request_rate: RequestRatePattern = Field(default_factory=RequestRatePattern)


class FloatBounds(CRDModel):
    min: float | None = None
    max: float | None = None
    fixed: float | None = Field(default=None, description="Pin the knob; the tuner does not search it.")


class IntBounds(CRDModel):
    min: int | None = Field(default=None, ge=1)
    max: int | None = Field(default=None, ge=1)
    fixed: int | None = Field(default=None, ge=1, description="Pin the knob; the tuner does not search it.")


def _search_space_spec() -> type[CRDModel]:
    """One optional bounds override per knob of the tuner's GPU space (its knobs are EngineConfig fields)."""
    fields: dict[str, Any] = {
        k.name: (FloatBounds | None if k.kind == "float" else IntBounds | None, None) for k in gpu_space().knobs
    }
    return create_model(
        "SearchSpaceSpec", __base__=CRDModel,
        __doc__="Overrides of the tuner's default bounds (see the tuner's documentation for the defaults).", **fields
    )


SearchSpaceSpec = _search_space_spec()


class TuningSpec(CRDModel):
    """Closed-loop tuning against `slo`; the study itself is the tuner's (issue 6), not the operator's."""

    enabled: bool = False
    max_trials: int = Field(default=20, ge=1, le=500)
    trial_duration_seconds: int = Field(default=120, ge=10)
    search_space: SearchSpaceSpec = Field(default_factory=SearchSpaceSpec)
    allow_quantization: bool = Field(
        default=False,
        description="Let the study also search quantization (fp8 weights) and kvCacheDtype (fp8 KV cache): "
        "they trade accuracy for speed, so they are searched only when allowed; status shows the precision chosen.",
    )
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    retune_below_attainment: float | None = Field(
        default=None, gt=0, le=1, description="Re-tune when live SLO attainment drops below this share."
    )


class VerifySpec(CRDModel):
    smoke_prompt: str = Field(default="Hello", min_length=1)
    smoke_max_tokens: int = Field(default=8, ge=1, le=512)
    timeout_seconds: float = Field(default=30, gt=0, le=600)
    slo_check_seconds: int = Field(
        default=0, ge=0, description="Window read from Prometheus before promotion; 0 skips it."
    )


class RolloutSpec(CRDModel):
    strategy: Literal["BlueGreen"] = "BlueGreen"
    ready_timeout_seconds: float = Field(default=900, gt=0)
    verify: VerifySpec = Field(default_factory=VerifySpec)
    scale_down_delay_seconds: float = Field(default=60, ge=0)
    auto_rollback: bool = True


class _RouterSpecBase(CRDModel):
    """What the operator adds around the router's knobs (those come from RouterConfig: router_knobs.py)."""

    replicas: int = Field(
        default=2, ge=1, le=32, description="Router pods behind the stable Service. Two or more keep the endpoint up "
        "through a node's loss and a rolling update (their PodDisruptionBudget lets one go at a time). Each reads "
        "every engine's metrics and block events: add routers for request rate, not for engines.")
    cpu: int | str = Field(default="1", json_schema_extra=QUANTITY, description="CPU request and limit per router.")
    memory: int | str = Field(default="1Gi", json_schema_extra=QUANTITY,
                              description="Memory request and limit per router.")

    _quantities = field_validator("cpu", "memory")(lambda value: _quantity(value))


RouterSpec = router_knobs_model(
    "RouterSpec", _RouterSpecBase, "The prefix-cache-aware router in front of the engines: its pods, and every "
    "RouterConfig knob (unset: the router's default)."
)


class AutoscalingSpec(CRDModel):
    """Replicas of the active revision from a live signal, instead of `spec.replicas` (which it then overrides)."""

    min_replicas: int = Field(default=1, ge=0, le=100, description="0 scales to zero when idle: the routers hold "
                              "requests in their bounded queue while the first engine starts.")
    max_replicas: int = Field(default=4, ge=1, le=100)
    signal: Literal["Demand", "SLOAttainment", "QueueDepth"] = Field(
        default="Demand", description="Demand: output tokens/s demanded over the per-replica goodput at the SLO; "
        "SLOAttainment: add a replica while the share of requests within the SLO is below the target; QueueDepth: "
        "requests waiting (routers' queue and engines') per replica.")
    goodput_per_replica: float | None = Field(
        default=None, gt=0, description="Output tokens/s one replica serves within the SLO (Demand). Unset: the "
        "best tuning trial's measured goodput.")
    target_utilization: float = Field(default=0.8, gt=0, le=1,
                                      description="Share of that goodput to plan for (Demand): headroom for bursts.")
    target_attainment: float = Field(default=0.95, gt=0, le=1, description="SLOAttainment's target share.")
    target_queue_depth: float = Field(default=4, gt=0, description="Waiting requests per replica (QueueDepth).")
    window_seconds: int = Field(default=30, ge=5, le=600, description="The window each reading averages over.")
    scale_up_stabilization_seconds: int = Field(
        default=0, ge=0, le=3600, description="Scale up to the lowest recommendation of this window (0: at once).")
    scale_down_stabilization_seconds: int = Field(
        default=120, ge=0, le=3600, description="Scale down only to the highest recommendation of this window, so "
        "replicas do not flap. Status keeps the last 64 recommendations: at the operator's default 5 s refresh a "
        "window covers at most 320 s.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.minReplicas ({self.min_replicas}) exceeds maxReplicas ({self.max_replicas})")
        return self


class MonitoringSpec(CRDModel):
    service_monitor: bool = Field(default=True, description="Create a ServiceMonitor when its CRD exists.")
    prometheus_url: str | None = Field(default=None, pattern=r"^https?://.+")


class InferenceServiceSpec(CRDModel):
    model: ModelSpec
    engine: EngineSpec = Field(default_factory=EngineSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    replicas: int = Field(default=1, ge=0, le=100)
    slo: SLOSpec = Field(default_factory=SLOSpec)
    tuning: TuningSpec = Field(default_factory=TuningSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    autoscaling: AutoscalingSpec | None = Field(
        default=None, description="Unset: `replicas` serves. Set: the operator scales the active revision.")
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)

    @model_validator(mode="after")
    def _gpus_fit_tensor_parallel(self) -> InferenceServiceSpec:
        gpus, tp = self.resources.gpus_per_replica, self.engine.tensor_parallel_size or 1
        if gpus == 0 and tp != 1:
            raise ValueError("engine.tensorParallelSize must be 1 when resources.gpusPerReplica is 0 (CPU)")
        if gpus and gpus % tp:
            raise ValueError(f"resources.gpusPerReplica ({gpus}) must be a multiple of tensorParallelSize ({tp})")
        return self


# CEL rules mirroring the cross-field validators above, so a real API server rejects at admission.
SPEC_CEL_RULES: list[dict[str, str]] = [
    {
        "rule": "!has(self.resources) || !has(self.resources.gpusPerReplica) || self.resources.gpusPerReplica != 0"
        " || !has(self.engine) || !has(self.engine.tensorParallelSize) || self.engine.tensorParallelSize == 1",
        "message": "engine.tensorParallelSize must be 1 when resources.gpusPerReplica is 0 (CPU)",
    },
    {
        "rule": "!has(self.autoscaling) || (has(self.autoscaling.minReplicas) ? self.autoscaling.minReplicas : 1)"
        " <= (has(self.autoscaling.maxReplicas) ? self.autoscaling.maxReplicas : 4)",
        "message": "autoscaling.minReplicas must not exceed maxReplicas",
    },
    {
        "rule": "!has(self.resources) || !has(self.resources.gpusPerReplica) || self.resources.gpusPerReplica == 0"
        " || self.resources.gpusPerReplica % (has(self.engine) && has(self.engine.tensorParallelSize)"
        " ? self.engine.tensorParallelSize : 1) == 0",
        "message": "resources.gpusPerReplica must be a multiple of engine.tensorParallelSize",
    },
]

# The InferenceService's name prefixes every child (Deployment `<name>-<revision>`, pods beyond it).
MAX_NAME_LENGTH = 42
ROOT_CEL_RULES: list[dict[str, str]] = [
    {
        "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters (children append a revision)",
    }
]


def parse_spec(raw: dict[str, Any]) -> InferenceServiceSpec:
    """Validate a CR's spec; raises pydantic.ValidationError with every problem listed."""
    return InferenceServiceSpec.model_validate(raw)
