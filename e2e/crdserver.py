"""What the API server does for a CustomResourceDefinition, so that real kubectl works against the test one.

From the CRD kvpilot generates (operator/crd.py), as kube-apiserver's apiextensions does it:
- the OpenAPI v3 document of its group-version (`/openapi/v3/apis/kvpilot.dev/v1alpha1`), whose POST and
  PATCH operations take `fieldValidation`, so `kubectl apply` validates on the server without `--validate=false`;
- structural-schema handling of every write: defaults applied, unknown fields pruned (with `fieldValidation=
  Strict` a 400 naming them, otherwise a Warning header each), and values checked against the schema, a 422
  with the API server's `Status` (reason Invalid, one cause per field) when they break it;
- Table responses (`Accept: ...;as=Table`) with the CRD's printer columns, for `kubectl get`.
Not done: the CRD's CEL rules (x-kubernetes-validations) are not evaluated here; the operator reports a
spec that breaks them as InvalidSpec.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from typing import Any

import jsonschema
from kvpilot.operator.crd import crd_manifest
from kvpilot.operator.spec import GROUP, KIND, PLURAL, VERSION

GROUP_VERSION_PATH = f"apis/{GROUP}/{VERSION}"
_GVK = {"group": GROUP, "version": VERSION, "kind": KIND}
_SCHEMA_NAME = f"dev.kvpilot.{VERSION}.{KIND}"


def _version() -> dict[str, Any]:
    return crd_manifest()["spec"]["versions"][0]


def schema() -> dict[str, Any]:
    return _version()["schema"]["openAPIV3Schema"]


def openapi_root() -> dict[str, Any]:
    return {"paths": {GROUP_VERSION_PATH: {"serverRelativeURL": f"/openapi/v3/{GROUP_VERSION_PATH}?hash=kvpilot"}}}


def openapi_group_version() -> dict[str, Any]:
    """The group-version's document: the resource's paths (POST and PATCH take fieldValidation) and its schema."""
    ref = {"$ref": f"#/components/schemas/{_SCHEMA_NAME}"}
    field_validation = {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}}
    body = {"content": {"application/json": {"schema": ref}}}
    ok = {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}}
    collection = f"/{GROUP_VERSION_PATH}/namespaces/{{namespace}}/{PLURAL}"
    operation = {"x-kubernetes-group-version-kind": _GVK, "parameters": [field_validation], "responses": ok}
    component = {**copy.deepcopy(schema()), "x-kubernetes-group-version-kind": [_GVK]}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": {
            collection: {"post": {**operation, "requestBody": body}, "get": {"responses": ok}},
            f"{collection}/{{name}}": {"patch": {**operation, "requestBody": body}, "get": {"responses": ok},
                                       "put": {**operation, "requestBody": body}},
        },
        "components": {"schemas": {_SCHEMA_NAME: component}},
    }


def apply_defaults(obj: Any, node: dict[str, Any]) -> Any:
    """Schema defaults for absent fields, recursively (a defaulted object gets its own nested defaults)."""
    if isinstance(obj, dict) and node.get("properties"):
        for name, prop in node["properties"].items():
            if name not in obj and "default" in prop:
                obj[name] = copy.deepcopy(prop["default"])
            if name in obj:
                obj[name] = apply_defaults(obj[name], prop)
    elif isinstance(obj, list) and isinstance(node.get("items"), dict):
        return [apply_defaults(item, node["items"]) for item in obj]
    return obj


def prune(obj: Any, node: dict[str, Any], path: str = "") -> list[str]:
    """Remove fields the structural schema does not know (in place); returns their paths."""
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return []
    unknown: list[str] = []
    if isinstance(obj, dict) and "properties" in node:
        for key in list(obj):
            if key not in node["properties"]:
                unknown.append(f"{path}.{key}".lstrip("."))
                del obj[key]
            else:
                unknown += prune(obj[key], node["properties"][key], f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(node.get("additionalProperties"), dict):
        for key, value in obj.items():
            unknown += prune(value, node["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(obj):
            unknown += prune(item, node["items"], f"{path}[{i}]")
    return unknown


def _field(error: jsonschema.ValidationError) -> str:
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


def _cause(error: jsonschema.ValidationError) -> dict[str, str]:
    """One cause as kube-apiserver words it for the schema rule that failed."""
    field, value, rule = _field(error), json.dumps(error.instance), error.validator
    if rule == "required":
        missing = error.message.split("'")[1]
        field = f"{field}.{missing}".lstrip(".")
        return {"reason": "FieldValueRequired", "message": "Required value", "field": field}
    if rule == "enum":
        allowed = ", ".join(json.dumps(v) for v in error.validator_value)
        return {"reason": "FieldValueNotSupported", "field": field,
                "message": f"Unsupported value: {value}: supported values: {allowed}"}
    words = {
        "maximum": f"should be less than or equal to {error.validator_value}",
        "minimum": f"should be greater than or equal to {error.validator_value}",
        "pattern": f"should match '{error.validator_value}'",
        "type": f"must be of type {error.validator_value}",
        "maxLength": f"should be at most {error.validator_value} chars long",
        "minLength": f"should be at least {error.validator_value} chars long",
    }
    detail = words.get(str(rule), error.message)
    return {"reason": "FieldValueInvalid", "field": field,
            "message": f"Invalid value: {value}: {field} in body {detail}"}


def invalid(obj: dict[str, Any]) -> list[dict[str, str]]:
    """Every schema violation of `obj` as a Status cause (empty when valid)."""
    validator = jsonschema.Draft4Validator(schema())
    return [_cause(e) for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))]


def invalid_status(name: str, causes: list[dict[str, str]]) -> dict[str, Any]:
    text = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 422,
            "reason": "Invalid", "message": f'{KIND}.{GROUP} "{name}" is invalid: [{text}]' if len(causes) > 1
            else f'{KIND}.{GROUP} "{name}" is invalid: {text}',
            "details": {"name": name, "group": GROUP, "kind": KIND, "causes": causes}}


def strict_status(unknown: list[str]) -> dict[str, Any]:
    fields = ", ".join(f'unknown field "{u}"' for u in unknown)
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 400,
            "reason": "BadRequest",
            "message": f'{KIND} in version "{VERSION}" cannot be handled as a {KIND}: strict decoding error: {fields}'}


def _json_path(obj: Any, path: str) -> Any:
    for key in path.strip(".").split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def age(timestamp: str | None, now: dt.datetime | None = None) -> str:
    """An RFC 3339 time as the age kubectl shows (`45s`, `3m12s`, `2h`, `4d`), as the API server's table
    convertor renders `date` columns."""
    if not timestamp:
        return "<unknown>"
    seconds = int(((now or dt.datetime.now(dt.UTC)) - dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")))
                  .total_seconds())
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 48:
        return f"{hours}h"
    return f"{days}d"


def _cell(obj: dict[str, Any], column: dict[str, Any]) -> Any:
    value = _json_path(obj, column["jsonPath"])
    return age(value) if column["type"] == "date" else value


def table(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table of the objects: Name, then the CRD's additionalPrinterColumns."""
    printer = _version()["additionalPrinterColumns"]
    columns = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                "description": "Name must be unique within a namespace."}]
    columns += [{"name": c["name"], "type": c["type"], "format": "", "priority": c.get("priority", 0),
                 "description": c.get("description", "")} for c in printer]
    rows = [{"cells": [o["metadata"]["name"], *(_cell(o, c) for c in printer)],
             "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}}
            for o in items]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {}, "columnDefinitions": columns,
            "rows": rows}


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def field_selector_matches(selector: str, obj: dict[str, Any]) -> bool:
    """Equality field selectors (`involvedObject.name=x,metadata.namespace=y`), as kubectl describe sends."""
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if str(_json_path(obj, key.rstrip("=")) or "") != value.lstrip("="):
            return False
    return True
