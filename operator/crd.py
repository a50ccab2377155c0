"""The InferenceService CRD, generated from the pydantic models so the schema can never drift from them.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 subset: no $ref, no
anyOf-with-null, no titles, `exclusiveMinimum` as a flag, and `default: {}` on optional objects so
nested defaults apply when the user leaves the object out.
"""

from __future__ import annotations

from typing import Any

import yaml
from kvpilot.operator.spec import (
    GROUP,
    KIND,
    PLURAL,
    ROOT_CEL_RULES,
    SHORT_NAMES,
    SINGULAR,
    SPEC_CEL_RULES,
    VERSION,
    InferenceServiceSpec,
)
from kvpilot.operator.status import InferenceServiceStatus

_DROP = {"title", "additionalProperties", "$defs"}


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _structural(node: Any, defs: dict[str, Any], object_defaults: bool) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs, object_defaults) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
        elif len(options) == 1:
            node = {**_structural(options[0], defs, object_defaults), **node}
        else:
            raise ValueError(f"no structural form for anyOf {options}")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if not isinstance(node.get(flag, True), bool):  # a number: JSON Schema 2020 style
            node[bound], node[flag] = node[flag], True
    if node.get("additionalProperties") not in (None, False, True):
        node["additionalProperties"] = _structural(node["additionalProperties"], defs, object_defaults)
        keep_additional = True
    else:
        keep_additional = False
    if "default" in node and node["default"] is None:
        del node["default"]
    elif "default" in node:
        node["default"] = _without_nulls(node["default"])
    optional_nulls = {name for name, prop in node.get("properties", {}).items() if prop.get("default", 0) is None}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP and not (key == "additionalProperties" and keep_additional):
            continue
        if key == "properties":
            out[key] = {name: _structural(prop, defs, object_defaults) for name, prop in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs, object_defaults)
        else:
            out[key] = value
    required = set(out.get("required", []))
    for name, prop in out.get("properties", {}).items():
        optional_object = prop.get("type") == "object" and "properties" in prop and not prop.get("required")
        defaulted = name in required or name in optional_nulls or "default" in prop
        if object_defaults and optional_object and not defaulted:
            prop["default"] = {}
    return out


def model_schema(model: type, mode: str, object_defaults: bool) -> dict[str, Any]:
    """`object_defaults` gives optional objects `default: {}` (wanted for spec, noise for status)."""
    raw = model.model_json_schema(by_alias=True, mode=mode)  # type: ignore[attr-defined]
    return _structural(raw, raw.get("$defs", {}), object_defaults)


def openapi_schema() -> dict[str, Any]:
    spec = model_schema(InferenceServiceSpec, "validation", object_defaults=True)
    spec["x-kubernetes-validations"] = SPEC_CEL_RULES
    status = model_schema(InferenceServiceStatus, "serialization", object_defaults=False)
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": ROOT_CEL_RULES,
    }


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Revision", "type": "string", "jsonPath": ".status.activeRevision"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "TTFT p95", "type": "number", "jsonPath": ".status.ttftP95Ms", "description": "ms"},
    {"name": "Tok/s", "type": "number", "jsonPath": ".status.tokensPerSecond"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "listKind": f"{KIND}List",
                "categories": ["kvpilot"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    # /scale: an HPA or KEDA can drive spec.replicas (leave spec.autoscaling unset then).
                    "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas",
                                                             "statusReplicasPath": ".status.readyReplicas"}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `kvpilot crd` from kvpilot/operator/spec.py and status.py. Do not edit.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)
