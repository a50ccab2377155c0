"""Validate objects against the CRD's openAPIV3Schema, and check that schema is structural."""

from __future__ import annotations

from typing import Any

import jsonschema
from kvpilot.operator.crd import crd_manifest

_SCHEMA_KEYS_WITHOUT_TYPE = ("x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields")


def crd_schema() -> dict[str, Any]:
    return crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def validate_against_crd(obj: dict[str, Any]) -> None:
    """OpenAPI v3.0 schemas use draft-4's boolean exclusiveMinimum, hence Draft4Validator."""
    jsonschema.Draft4Validator(crd_schema()).validate(obj)


def structural_problems(node: Any, path: str = "") -> list[str]:
    """The rules of a structural schema that pydantic's output could break, as a list of problems."""
    if not isinstance(node, dict):
        return []
    problems = []
    for key in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs", "const"):
        if key in node:
            problems.append(f"{path or '/'}: has {key}")
    if "type" not in node and not any(node.get(k) for k in _SCHEMA_KEYS_WITHOUT_TYPE):
        problems.append(f"{path or '/'}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path or '/'}: both properties and additionalProperties")
    if "default" in node and node.get("type") == "object" and "properties" in node:
        try:
            jsonschema.Draft4Validator(node).validate(node["default"])
        except jsonschema.ValidationError as exc:
            problems.append(f"{path}: default invalid: {exc.message}")
    for name, child in (node.get("properties") or {}).items():
        problems += structural_problems(child, f"{path}/{name}")
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}{{}}")
    return problems
