"""The router's knobs in an InferenceService, derived from RouterConfig: one declaration per knob.

Every RouterConfig field is a field of `spec.router` (camelCased: `max_queued` -> `maxQueued`) unless ROUTER_ONLY
names it with where the operator takes its value from. Unset means the router's own default, and the pod gets
only the flags that were set, besides the operator's own.
"""

from __future__ import annotations

from typing import Any

from kvpilot.operator.knob_fields import optional_field
from kvpilot.router.config import RouterConfig, to_args
from pydantic import BaseModel, create_model

# RouterConfig fields an InferenceService does not set, and where their value comes from instead.
ROUTER_ONLY: dict[str, str] = {
    "host": "the pod listens on every address",
    "port": "the router container's port (8080), which the stable Service targets",
    "backend": "engines come from Kubernetes, never a fixed list",
    "k8s_service": "the `<name>-engines` Service, whose selector the operator switches at a promotion",
    "k8s_namespace": "the InferenceService's namespace",
    "k8s_pod_selector": "the InferenceService's engine pods, across revisions",
    "k8s_port": "the engines Service's targetPort (the engine container's port named http)",
    "tokenizer": "spec.model: the demo tokenizer, or the model's claim mounted read-only",
    "block_size": "spec.engine.blockSize, until the engines report theirs",
}


def router_knob_names() -> list[str]:
    return [name for name in RouterConfig.model_fields if name not in ROUTER_ONLY]


def router_knobs_model(name: str, base: type[BaseModel], doc: str) -> type[BaseModel]:
    """A model with one optional field per router knob, over `base` (which adds what is not a knob)."""
    fields = {k: optional_field(RouterConfig, k) for k in router_knob_names()}
    return create_model(name, __base__=base, __doc__=doc, **fields)


def router_args(router: BaseModel, **own: Any) -> list[str]:
    """`kvpilot router` flags: the operator's own settings (`own`, always written) and the knobs set in
    spec.router. RouterConfig validates the whole, so a combination the router would refuse fails here."""
    chosen = {k: v for k in router_knob_names() if (v := getattr(router, k)) is not None}
    return to_args(RouterConfig(**own, **chosen), always=tuple(own))
