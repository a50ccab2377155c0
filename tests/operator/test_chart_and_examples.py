"""The Helm chart renders and lints with Helm's own SDK; every manifest validates against Kubernetes' schemas,
and every example and every child the operator builds validates against the CRD schema / Kubernetes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from kvpilot.operator import resources as res
from kvpilot.operator.chart_values import ChartValues, values_schema_json
from kvpilot.operator.config import DEFAULT_ROUTER_IMAGE
from kvpilot.operator.crd import GROUP, KIND, VERSION, crd_manifest
from kvpilot.operator.router_resources import router_children, router_rbac
from kvpilot.operator.spec import parse_spec

from .schema import validate_against_crd

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kvpilot"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
K8S_VERSION = "1.30"
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced-with-monitoring": {
        "operator": {"watchNamespaces": ["team-a", "team-b"], "resyncSeconds": 5},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "grafanaDashboard": {"enabled": True},
        "rbac": {"readSecrets": False},
        "image": {"tag": "0.1.0-rc1"},
    },
    "no-crds-external-sa": {"crds": {"install": False}, "serviceAccount": {"create": False, "name": "ops"}},
}


def validate_k8s(manifest: dict[str, Any]) -> None:
    """Built-in kinds against Kubernetes' own schemas; the Prometheus operator's kinds are not in them."""
    if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
        assert manifest["kind"] == "ServiceMonitor" and manifest["spec"]["endpoints"]
        return
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm_python.Chart.load(str(CHART))
    rendered = chart.render(values, name="kvpilot", namespace="kvpilot-system")
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def test_values_schema_is_generated_from_the_model():
    stored = (CHART / "values.schema.json").read_text()
    assert stored == values_schema_json(), (
        "run: python -m kvpilot.operator.chart_values > charts/kvpilot/values.schema.json"
    )
    ChartValues.model_validate(yaml.safe_load((CHART / "values.yaml").read_text()))


def test_chart_lints_clean():
    report = helm_python.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_chart_renders_valid_manifests(name: str):
    docs = render(VALUE_SETS[name])
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        validate_k8s(doc)
    assert ("Deployment", "kvpilot") in kinds
    if name == "defaults":
        crd = next(d for d in docs if d["kind"] == "CustomResourceDefinition")
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["spec"] == yaml.safe_load((ROOT / "crds" / "inferenceservices.kvpilot.dev.yaml").read_text())["spec"]
        assert ("ClusterRoleBinding", "kvpilot-manager") in kinds
        # Before: every Secret in the cluster was readable by default, and `update` granted on everything.
        rules = [r for d in docs if d["kind"] == "ClusterRole" for r in d["rules"]]
        assert not any("secrets" in r["resources"] for r in rules)
        assert not any("update" in r["verbs"] or "events.k8s.io" in r["apiGroups"] for r in rules)
    if name == "namespaced-with-monitoring":
        bindings = [d for d in docs if d["kind"] == "RoleBinding"]
        assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
        assert ("ClusterRoleBinding", "kvpilot-manager") not in kinds
        assert ("ServiceMonitor", "kvpilot-engines") in kinds
        dashboards = next(d for d in docs if d["kind"] == "ConfigMap")
        shipped = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
        assert sorted(dashboards.get("data") or {}) == shipped
        for text in (dashboards.get("data") or {}).values():
            json.loads(text)
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--namespace=team-a" in args and "--resync-seconds=5" in args
        manager = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("manager"))
        assert not any("secrets" in rule["resources"] for rule in manager["rules"])
    if name == "no-crds-external-sa":
        assert not any(d["kind"] in ("CustomResourceDefinition", "ServiceAccount") for d in docs)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_the_crd_and_the_models(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        validate_against_crd(doc)
        spec = parse_spec(doc["spec"])
        revision = res.revision_of(spec)
        name, namespace = doc["metadata"]["name"], "default"
        children = res.revision_children(name, namespace, spec, revision)
        children += res.shared_children(name, namespace, revision, service_monitors=True)
        children += router_children(name, namespace, spec, revision, DEFAULT_ROUTER_IMAGE)
        children += router_children(name, namespace, spec, revision, DEFAULT_ROUTER_IMAGE, direct=revision)[-2:]
        for child in children:
            validate_k8s(child)


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_chart_lets_the_operator_create_and_grant_the_routers_role(name: str):
    """Kubernetes refuses to let anyone create a Role (or bind one) granting more than they hold themselves: the
    operator must hold every permission of the routers' Role, and may write Roles and RoleBindings."""
    docs = render(VALUE_SETS[name])
    manager = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("manager"))
    held = _grants(manager["rules"])
    role = next(d for d in router_rbac("llm", "team-a") if d["kind"] == "Role")
    assert _grants(role["rules"]) <= held
    for kind in ("roles", "rolebindings"):
        assert {("rbac.authorization.k8s.io", kind, v) for v in ("create", "patch", "list", "watch")} <= held


def test_examples_cover_cpu_one_gpu_and_two_gpus():
    gpus = sorted(parse_spec(yaml.safe_load(p.read_text())["spec"]).resources.gpus_per_replica for p in EXAMPLES)
    assert gpus == [0, 1, 2]


def test_the_hpa_example_validates_and_targets_the_scale_subresource():
    """KEDA/HPA users: the example is a valid HorizontalPodAutoscaler, and what it targets has /scale."""
    hpa = yaml.safe_load((ROOT / "examples" / "hpa" / "llama-8b-hpa.yaml").read_text())
    validate_k8s(hpa)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == (f"{GROUP}/{VERSION}", KIND)
    version = crd_manifest()["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
