"""The routers the operator deploys, as built: what they are told, what they may read, what selects them."""

from __future__ import annotations

import argparse

from kvpilot.operator import resources as res
from kvpilot.operator.router_resources import router_children, router_container_args
from kvpilot.operator.spec import parse_spec
from kvpilot.router.config import RouterConfig, add_flags, from_args

from .conftest import BASE_SPEC


def spec(**overrides):
    return parse_spec({**BASE_SPEC, **overrides})


def _children(s, direct=None) -> dict[tuple[str, str], dict]:
    return {(c["kind"], c["metadata"]["name"]): c for c in router_children("llm", "team", s, "aaa", "img:1", direct)}


def _config(args: list[str]) -> RouterConfig:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return from_args(parser.parse_args(args))


def test_the_routers_follow_the_active_revision_through_the_engines_service():
    by_name = _children(spec())
    engines = by_name[("Service", "llm-engines")]
    assert engines["spec"]["clusterIP"] == "None" and engines["spec"]["selector"] == res.pod_selector("llm", "aaa")
    stable = by_name[("Service", "llm")]["spec"]
    assert stable["selector"]["app.kubernetes.io/component"] == "router" and "kvpilot.dev/revision" not in stable[
        "selector"]
    assert stable["ports"][0]["targetPort"] == "http"
    config = _config(router_container_args("llm", "team", spec()))
    assert (config.k8s_service, config.k8s_namespace, config.tokenizer, config.port) == ("llm-engines", "team",
                                                                                         "demo", res.PORT)
    pods = dict(pair.split("=") for pair in (config.k8s_pod_selector or "").split(","))
    assert pods == {**res.pod_selector("llm"), "app.kubernetes.io/component": "engine"}


def test_no_router_ready_means_the_stable_service_selects_the_engines_directly():
    stable = _children(spec(), direct="aaa")[("Service", "llm")]["spec"]["selector"]
    assert stable == res.pod_selector("llm", "aaa")


def test_router_knobs_reach_the_pods_and_defaults_stay_unwritten():
    args = router_container_args("llm", "team", spec(router={"maxQueued": 8, "queueTimeoutS": 90}))
    assert "--max-queued=8" in args and "--queue-timeout-s=90.0" in args
    assert not any(a.startswith("--load-factor") for a in args)
    assert _config(args).max_queued == 8
    deployment = _children(spec(router={"replicas": 3, "drainTimeoutS": 10}))[("Deployment", "llm-router")]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 10 + 5  # drain + preStop


def test_the_tokenizer_comes_from_the_model_where_the_router_can_read_it():
    claim = spec(model={"name": "m", "uri": "pvc://weights/llama"})
    pod = _children(claim)[("Deployment", "llm-router")]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert pod["containers"][0]["volumeMounts"][0]["readOnly"] is True
    assert _config(pod["containers"][0]["args"]).tokenizer == "/mnt/model/llama"
    for uri in ("hostpath:///data/m", "/opt/models/m"):  # not readable under the restricted standard / not there
        args = router_container_args("llm", "team", spec(model={"name": "m", "uri": uri}))
        assert _config(args).tokenizer is None


def test_the_routers_role_reads_pods_and_the_one_engines_service():
    by_name = _children(spec())
    rules = by_name[("Role", "llm-router")]["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
                     {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"],
                      "resourceNames": ["llm-engines"]}]
    binding = by_name[("RoleBinding", "llm-router")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llm-router", "namespace": "team"}]
    assert by_name[("Deployment", "llm-router")]["spec"]["template"]["spec"]["serviceAccountName"] == "llm-router"


def test_the_engines_and_routers_budgets_never_cover_the_same_pod():
    """Kubernetes refuses to evict a pod two PodDisruptionBudgets select."""
    router_pdb = _children(spec())[("PodDisruptionBudget", "llm-router")]["spec"]["selector"]["matchLabels"]
    engine_pdb = res.pod_disruption_budget("llm", "team")["spec"]["selector"]["matchLabels"]
    router_pod = _children(spec())[("Deployment", "llm-router")]["spec"]["template"]["metadata"]["labels"]
    engine_pod = res.pod_template("llm", spec(), "aaa")["metadata"]["labels"]
    assert router_pdb.items() <= router_pod.items() and not engine_pdb.items() <= router_pod.items()
    assert engine_pdb.items() <= engine_pod.items() and not router_pdb.items() <= engine_pod.items()
