"""The CRD is generated from the pydantic models; the checked-in copies must match the generator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from kvpilot.operator.crd import crd_manifest, crd_yaml
from kvpilot.operator.spec import parse_spec

from .conftest import BASE_SPEC, isvc
from .schema import crd_schema, structural_problems, validate_against_crd

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "inferenceservices.kvpilot.dev.yaml"
CHART_CRD_FILE = ROOT / "charts" / "kvpilot" / "files" / "inferenceservices.kvpilot.dev.yaml"
REGENERATE = "python -m kvpilot crd -o crds/inferenceservices.kvpilot.dev.yaml && cp crds/*.yaml charts/kvpilot/files/"


def test_checked_in_crd_matches_the_models():
    assert CRD_FILE.read_text() == crd_yaml(), f"stale CRD: run `{REGENERATE}`"
    assert CHART_CRD_FILE.read_text() == crd_yaml(), f"stale chart CRD: run `{REGENERATE}`"


def test_kvpilot_crd_command_prints_it():
    out = subprocess.run([sys.executable, "-m", "kvpilot", "crd"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(out.stdout) == crd_manifest()


def test_crd_is_structural_with_status_printer_columns_and_short_name():
    assert structural_problems(crd_schema()) == []
    version = crd_manifest()["spec"]["versions"][0]
    assert version["subresources"] == {  # /scale: what an HPA or KEDA targets
        "status": {}, "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.readyReplicas"}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Model",
        "Revision",
        "Phase",
        "TTFT p95",
        "Tok/s",
        "Age",
    ]
    names = crd_manifest()["spec"]["names"]
    assert names["shortNames"] == ["kvis"]  # not `isvc`: KServe has it
    spec = crd_schema()["properties"]["spec"]
    assert spec["required"] == ["model"]
    assert spec["x-kubernetes-validations"]
    assert spec["properties"]["engine"]["properties"]["gpuMemoryUtilization"]["maximum"] == 0.99
    assert spec["properties"]["rollout"]["default"] == {}  # nested defaults apply when omitted


def test_crd_defaults_agree_with_the_models():
    """What the API server fills in must be what the operator assumes when a field is left out."""

    def defaults(schema: dict) -> dict:
        out = {}
        for name, prop in schema.get("properties", {}).items():
            if "properties" in prop and ("default" in prop or name == "model"):
                out[name] = {**defaults(prop), **prop.get("default", {})}  # as the API server: default, then nested
            elif "default" in prop:
                out[name] = prop["default"]
        return out

    filled = defaults(crd_schema()["properties"]["spec"])
    filled["model"] = {**filled["model"], "name": "m", "uri": "demo"}
    assert parse_spec(filled) == parse_spec({"model": {"name": "m", "uri": "demo"}})


@pytest.mark.parametrize(
    "bad",
    [
        {"engine": {"gpuMemoryUtilization": 1.5}},
        {"engine": {"maxNumSeqs": 0}},
        {"model": {"name": "m", "uri": "s3://bucket/model"}},
        {"rollout": {"strategy": "Canary"}},
        {"replicas": -1},
    ],
)
def test_schema_and_models_reject_the_same_invalid_specs(bad):
    body = isvc("x", **bad)
    with pytest.raises(jsonschema.ValidationError):
        validate_against_crd(body)
    with pytest.raises(ValueError):
        parse_spec(body["spec"])


def test_models_reject_what_the_cel_rules_reject():
    with pytest.raises(ValueError, match="tensorParallelSize must be 1"):
        parse_spec({**BASE_SPEC, "engine": {"tensorParallelSize": 2}})
    with pytest.raises(ValueError, match="multiple of tensorParallelSize"):
        parse_spec({**BASE_SPEC, "resources": {"gpusPerReplica": 3}, "engine": {"tensorParallelSize": 2}})
    with pytest.raises(ValueError, match="Extra inputs"):
        parse_spec({**BASE_SPEC, "engine": {"gpuMemoryUtilisation": 0.8}})  # a typo is an error
