"""A configuration model's field as an optional CRD field: one declaration per knob, wherever the knob lives.

`spec.engine` takes EngineConfig's knobs (engine_knobs.py) and `spec.router` RouterConfig's (router_knobs.py) this
way: the field's type, bounds and description are the source model's, optionally narrowed for a cluster, and its
default is named in the description, because in the CRD every knob is optional (unset: the program's default).
"""

from __future__ import annotations

from typing import Annotated, Any

import annotated_types
from pydantic import BaseModel, Field


def _side(constraint: Any) -> str:
    if isinstance(constraint, annotated_types.Ge | annotated_types.Gt):
        return "lower"
    if isinstance(constraint, annotated_types.Le | annotated_types.Lt):
        return "upper"
    return type(constraint).__name__


def optional_field(source: type[BaseModel], name: str,
                   narrower: tuple[annotated_types.BaseMetadata, ...] = ()) -> tuple[Any, Any]:
    """(annotation, Field) for `source.name` as an optional field; `narrower` replaces the bounds on its sides."""
    info = source.model_fields[name]
    default = info.get_default(call_default_factory=True)
    description = info.description or name
    if default is not None:
        description += f". Unset: {str(default).lower() if isinstance(default, bool) else default}."
    inner = info.annotation
    args = getattr(inner, "__args__", None)
    if args and type(None) in args and len(args) == 2:
        inner = next(a for a in args if a is not type(None))
    sides = {_side(c) for c in narrower}
    constraints = [*(c for c in info.metadata if _side(c) not in sides), *narrower]
    annotation = Annotated[inner, *constraints] if constraints else inner
    return annotation | None, Field(default=None, description=description)


def defaults(source: type[BaseModel], names: list[str]) -> dict[str, Any]:
    return {k: source.model_fields[k].get_default(call_default_factory=True) for k in names}
