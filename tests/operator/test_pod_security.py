"""Every pod kvpilot renders or builds meets the restricted Pod Security Standard (pod_security.py), runs as its
own ServiceAccount with no token, and has CPU requests and limits; the operator's policy refuses what a
namespace's InferenceService author must not ask for."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kvpilot.operator import resources as res
from kvpilot.operator.config import DEFAULT_ROUTER_IMAGE, OperatorConfig
from kvpilot.operator.load_job import load_job
from kvpilot.operator.policy import secret_violation, violations
from kvpilot.operator.router_resources import router_deployment
from kvpilot.operator.spec import parse_spec

from .conftest import BASE_SPEC
from .pod_security import restricted_violations
from .test_chart_and_examples import EXAMPLES, VALUE_SETS, render

ROOT = Path(__file__).resolve().parents[2]


def _pods() -> list[tuple[str, dict]]:
    pods = []
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            spec = parse_spec(doc["spec"])
            name = doc["metadata"]["name"]
            pods.append((f"{path.name} engine", res.pod_template(name, spec, "r1")["spec"]))
            job = load_job(name, "default", spec, "trial-abcdef-0", 0, 2.0, 10, "http://x")
            pods.append((f"{path.name} load Job", job["spec"]["template"]["spec"]))
            router = router_deployment(name, "default", spec, DEFAULT_ROUTER_IMAGE)
            pods.append((f"{path.name} router", router["spec"]["template"]["spec"]))
    for values in VALUE_SETS:
        for doc in render(VALUE_SETS[values]):
            if doc["kind"] == "Deployment":
                pods.append((f"chart {values} {doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
    return pods


@pytest.mark.parametrize(("what", "pod"), _pods(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_pod_meets_the_restricted_standard(what: str, pod: dict) -> None:
    assert restricted_violations(pod) == [], what
    if "chart" in what:
        return
    if "router" in what:  # it watches pods and its Service: its own account, token mounted (router_rbac)
        assert pod["automountServiceAccountToken"] is True and pod["serviceAccountName"].endswith("-router")
    else:
        assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"].endswith("-engine")
    for container in pod["containers"]:
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["limits"]["cpu"], what


def test_the_checker_catches_what_the_pods_used_to_be():
    before = {"containers": [{"name": "engine", "image": "x"}],
              "volumes": [{"name": "model", "hostPath": {"path": "/"}}]}
    found = restricted_violations(before)
    assert any("hostPath" in v for v in found) and any("allowPrivilegeEscalation" in v for v in found)
    assert any("runAsNonRoot" in v for v in found) and any("seccompProfile" in v for v in found)
    assert any("drop must include ALL" in v for v in found)


def _spec(**overrides: object):
    return parse_spec({**BASE_SPEC, **overrides})


def test_hostpath_images_prometheus_and_secrets_follow_the_operator_configuration():
    root = _spec(model={"name": "m", "uri": "hostpath:////"})
    assert violations(root, OperatorConfig()) == [
        "spec.model.uri: hostpath:// models are off (the operator allows no host paths)"]
    allowed = OperatorConfig(allowed_host_paths=["/data/models"])
    assert violations(_spec(model={"name": "m", "uri": "hostpath:///data/models/llama"}), allowed) == []
    for escape in ("hostpath:////", "hostpath:///data/models/../../etc", "hostpath:///data/modelsx"):
        assert violations(_spec(model={"name": "m", "uri": escape}), allowed), escape
    registry = OperatorConfig(allowed_image_registries=["ghcr.io/kvpilot/"])
    assert violations(_spec(engine={"image": "evil.example/miner:1"}), registry)
    assert violations(_spec(engine={"image": "ghcr.io/kvpilot/kvpilot-engine:0.1.0"}), registry) == []
    ssrf = _spec(monitoring={"prometheusUrl": "http://169.254.169.254/latest/"})
    assert "prometheusUrl" in violations(ssrf, OperatorConfig())[0]
    assert violations(ssrf, OperatorConfig(allowed_prometheus_urls=["http://169.254.169.254/latest/"])) == []
    keyed = _spec(engine={"apiKeySecret": "db-password"})
    assert "not allowed to read Secrets" in violations(keyed, OperatorConfig())[0]
    assert violations(keyed, OperatorConfig(read_secrets=True)) == []
    assert "lacks the label" in secret_violation("db-password", {"metadata": {}, "data": {"api-key": "eA=="}})
    opted_in = {"metadata": {"labels": {"kvpilot.dev/api-key": "true"}}, "data": {"api-key": "eA=="}}
    assert secret_violation("k", opted_in) is None


@pytest.mark.parametrize("name", ["-x", "--model=/etc", "a b", ""])
def test_model_names_that_would_be_read_as_flags_are_refused(name: str):
    with pytest.raises(ValueError):
        _spec(model={"name": name, "uri": "demo"})
