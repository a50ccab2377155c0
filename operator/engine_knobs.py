"""The engine knobs of an InferenceService, derived from EngineConfig: one declaration per knob.

Every EngineConfig field is a field of `spec.engine` (camelCased: `max_num_seqs` -> `maxNumSeqs`) unless it
is listed in ENGINE_ONLY with the reason the operator sets it itself. A knob is optional in the CRD: unset
means the engine's own default (named in its description), so the API server stores nothing for it, a
revision's hash does not move when a knob is added, and the pod gets only the flags that were set. The
types, bounds and descriptions are EngineConfig's (knob_fields.py); CLUSTER_BOUNDS only narrows them for a
cluster.
"""

from __future__ import annotations

from typing import Any

import annotated_types
from kvpilot.engine.config import EngineConfig
from kvpilot.engine.flags import to_flags
from kvpilot.operator.knob_fields import defaults, optional_field
from pydantic import BaseModel, ConfigDict, create_model
from pydantic.alias_generators import to_camel

# EngineConfig fields an InferenceService does not set, and where their value comes from instead.
ENGINE_ONLY: dict[str, str] = {
    "model": "spec.model.uri (mounted into the pod)",
    "served_model_name": "spec.model.name",
    "revision": "the operator's revision hash, so every revision's metrics can be told apart",
    "device": "resources.gpusPerReplica (0 runs on CPU)",
}
# Tighter than the engine's own bounds: what makes sense for a cluster's GPUs.
CLUSTER_BOUNDS: dict[str, tuple[annotated_types.BaseMetadata, ...]] = {
    "gpu_memory_utilization": (annotated_types.Ge(0.05), annotated_types.Le(0.99)),
    "max_num_seqs": (annotated_types.Le(4096),),
    "max_num_batched_tokens": (annotated_types.Ge(16), annotated_types.Le(1048576)),
    "tensor_parallel_size": (annotated_types.Le(16),),
    "max_model_len": (annotated_types.Ge(16),),
}


class _CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def knob_names() -> list[str]:
    return [name for name in EngineConfig.model_fields if name not in ENGINE_ONLY]


def knobs_model(name: str, base: type[BaseModel], doc: str) -> type[BaseModel]:
    """A model with one optional field per knob, over `base` (which adds what is not a knob)."""
    fields = {k: optional_field(EngineConfig, k, CLUSTER_BOUNDS.get(k, ())) for k in knob_names()}
    return create_model(name, __base__=base, __doc__=doc, **fields)


EngineKnobs = knobs_model("EngineKnobs", _CamelModel, "The engine knobs a revision runs with.")


def _defaults() -> dict[str, Any]:
    return defaults(EngineConfig, knob_names())


def chosen_knobs(engine: BaseModel) -> dict[str, Any]:
    """The knobs of `engine` (an EngineSpec or EngineKnobs) that differ from the engine's defaults, snake_case:
    setting a knob to its default is the same configuration as leaving it unset."""
    defaults = _defaults()
    return {k: v for k in knob_names() if (v := getattr(engine, k)) is not None and v != defaults[k]}


def effective_knobs(engine: BaseModel) -> dict[str, Any]:
    """Every knob's value as the engine will run it: the chosen ones, else EngineConfig's defaults."""
    return {**_defaults(), **chosen_knobs(engine)}


def knob_args(engine: BaseModel) -> list[str]:
    """`kvpilot serve` flags for the chosen knobs (`--max-num-seqs=64`)."""
    return to_flags(chosen_knobs(engine))
