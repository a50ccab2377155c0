"""The test API server's CRD handling (what kubectl relies on): defaults, pruning, validation errors in the
API server's shape, Table rows with the printer columns, the OpenAPI document kubectl apply reads."""

from __future__ import annotations

import datetime as dt

from e2e import crdserver


def _isvc(**spec: object) -> dict:
    return {"apiVersion": "kvpilot.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "x", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"model": {"name": "m", "uri": "demo"}, **spec}}


def test_defaults_are_applied_and_unknown_fields_pruned():
    obj = _isvc(engine={"maxNumSeqz": 3}, replicas=2)
    crdserver.apply_defaults(obj, crdserver.schema())
    assert obj["spec"]["rollout"]["strategy"] == "BlueGreen" and obj["spec"]["model"]["revision"] == "main"
    assert obj["spec"]["replicas"] == 2
    assert crdserver.prune(obj, crdserver.schema()) == ["spec.engine.maxNumSeqz"]
    assert "maxNumSeqz" not in obj["spec"]["engine"] and crdserver.invalid(obj) == []


def test_violations_are_causes_naming_the_field():
    causes = crdserver.invalid(_isvc(engine={"gpuMemoryUtilization": 1.5}, rollout={"strategy": "Canary"}))
    assert {c["field"] for c in causes} == {"spec.engine.gpuMemoryUtilization", "spec.rollout.strategy"}
    status = crdserver.invalid_status("x", causes)
    assert status["code"] == 422 and status["reason"] == "Invalid"
    assert "should be less than or equal to 0.99" in status["message"]
    assert 'Unsupported value: "Canary": supported values: "BlueGreen"' in status["message"]


def test_table_rows_follow_the_printer_columns_and_age():
    obj = _isvc()
    obj["status"] = {"phase": "Ready", "activeRevision": "abc"}
    table = crdserver.table([obj])
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Model", "Revision", "Phase", "TTFT p95",
                                                                "Tok/s", "Age"]
    assert table["rows"][0]["cells"][:4] == ["x", "m", "abc", "Ready"]
    assert crdserver.age("2026-01-01T00:00:00Z", dt.datetime(2026, 1, 1, 0, 3, 5, tzinfo=dt.UTC)) == "3m5s"


def test_openapi_offers_server_side_field_validation():
    document = crdserver.openapi_group_version()
    patch = next(op["patch"] for path, op in document["paths"].items() if path.endswith("{name}"))
    assert {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}} in \
        patch["parameters"]
    root = crdserver.openapi_root()["paths"]["apis/kvpilot.dev/v1alpha1"]
    assert root["serverRelativeURL"].startswith("/openapi/v3/")
