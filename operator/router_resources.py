"""The router in front of each InferenceService's engines, as pure functions: (name, spec) -> manifests.

The stable Service `<name>` selects the router pods, not engines. The routers follow the headless Service
`<name>-engines`, whose selector is the active revision's labels: the operator switches it at a promotion, in
one write, and each router swaps its pool in one step (router/kube_source.py). The routers run as their own
ServiceAccount `<name>-router`, bound to a Role that can list and watch pods and only that one Service. The
pods meet the restricted Pod Security Standard; their token is mounted, since they watch the API.
"""

from __future__ import annotations

from typing import Any

from kvpilot.operator import resources as res
from kvpilot.operator.engine_knobs import effective_knobs
from kvpilot.operator.router_knobs import router_args
from kvpilot.operator.spec import InferenceServiceSpec
from kvpilot.router.config import RouterConfig

COMPONENT = "app.kubernetes.io/component"
ROUTER_PRESTOP_S = 5


def router_name(name: str) -> str:
    """Its Deployment, ServiceAccount, Role, RoleBinding and PodDisruptionBudget."""
    return f"{name}-router"


def engines_service_name(name: str) -> str:
    return f"{name}-engines"


def router_labels(name: str) -> dict[str, str]:
    return {**res.base_labels(name), "app.kubernetes.io/name": "kvpilot-router", COMPONENT: "router"}


def router_selector(name: str) -> dict[str, str]:
    return {**res.pod_selector(name), COMPONENT: "router"}


def engine_pods(name: str) -> dict[str, str]:
    """Every engine pod of the InferenceService, any revision: what the routers watch."""
    return {**res.pod_selector(name), COMPONENT: "engine"}


def tokenizer_source(spec: InferenceServiceSpec) -> tuple[str | None, list[dict[str, Any]], list[dict[str, Any]]]:
    """(--tokenizer, volumes, mounts): the demo model's built-in tokenizer, or the model's claim mounted read-only
    (its tokenizer.json and chat template; the router reads no weights). A hostPath model would break the
    restricted standard and a directory inside the engine image is not in the router's: those route text prompts by
    their leading characters (token-id prompts still by prefix)."""
    if spec.model.uri == "demo":
        return "demo", [], []
    if spec.model.uri.startswith("pvc://"):
        path, volumes, mounts = res.model_source(spec)
        return path, volumes, mounts
    return None, [], []


def _selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def router_container_args(name: str, namespace: str, spec: InferenceServiceSpec) -> list[str]:
    tokenizer, _, _ = tokenizer_source(spec)
    own: dict[str, Any] = {
        "host": "0.0.0.0", "port": res.PORT, "k8s_service": engines_service_name(name), "k8s_namespace": namespace,
        "k8s_pod_selector": _selector_string(engine_pods(name)),
        "block_size": effective_knobs(spec.engine)["block_size"],
    }
    if tokenizer is not None:
        own["tokenizer"] = tokenizer
    return router_args(spec.router, **own)


def _drain_timeout_s(spec: InferenceServiceSpec) -> float:
    chosen = spec.router.drain_timeout_s
    return RouterConfig().drain_timeout_s if chosen is None else chosen


def router_deployment(name: str, namespace: str, spec: InferenceServiceSpec, image: str) -> dict[str, Any]:
    _, volumes, mounts = tokenizer_source(spec)
    r = spec.router
    limits = {"cpu": str(r.cpu), "memory": str(r.memory)}
    container = {
        "name": "router",
        "image": image,
        "command": ["kvpilot", "router"],
        "args": router_container_args(name, namespace, spec),
        "ports": [{"name": "http", "containerPort": res.PORT, "protocol": "TCP"}],
        "env": [{"name": "RAYON_NUM_THREADS", "value": str(res.cpu_threads(r.cpu))}],  # the tokenizer's pool
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": mounts,
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 2, "failureThreshold": 30},
        # Ready while it runs, engines or not: with none up it still holds requests (scale from zero, a switch).
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        # Endpoints drop the pod while it sleeps; then SIGTERM gives requests in flight the drain timeout.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(ROUTER_PRESTOP_S)]}}},
    }
    spread = {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                 "labelSelector": {"matchLabels": router_selector(name)}}}
    pod_spec = {
        "containers": [container],
        "terminationGracePeriodSeconds": int(_drain_timeout_s(spec)) + ROUTER_PRESTOP_S + res.GRACE_MARGIN_SECONDS,
        "volumes": volumes,
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [spread]}},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": router_name(name), "namespace": namespace, "labels": router_labels(name)},
        "spec": {
            "replicas": r.replicas,
            "selector": {"matchLabels": router_selector(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": router_labels(name)},
                         "spec": res.restricted_pod(name, pod_spec, router_name(name), api_token=True)},
        },
    }


def router_rbac(name: str, namespace: str) -> list[dict[str, Any]]:
    """Its ServiceAccount, and a Role with what discovery reads and nothing more: pods (list, watch) and the one
    engines Service (list and watch by name)."""
    meta = {"name": router_name(name), "namespace": namespace, "labels": router_labels(name)}
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
             {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"],
              "resourceNames": [engines_service_name(name)]}]
    rbac = "rbac.authorization.k8s.io"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)},
        {"apiVersion": f"{rbac}/v1", "kind": "Role", "metadata": dict(meta), "rules": rules},
        {"apiVersion": f"{rbac}/v1", "kind": "RoleBinding", "metadata": dict(meta),
         "roleRef": {"apiGroup": rbac, "kind": "Role", "name": router_name(name)},
         "subjects": [{"kind": "ServiceAccount", "name": router_name(name), "namespace": namespace}]},
    ]


def router_children(name: str, namespace: str, spec: InferenceServiceSpec, serving_revision: str,
                    image: str, direct: str | None = None) -> list[dict[str, Any]]:
    """The routers, their identity and budget, the stable Service in front of them and the engines Service behind
    them, selecting `serving_revision`. `direct`: no router is ready, so the stable Service selects that
    revision's engines itself meanwhile (router_status.py)."""
    stable = res.pod_selector(name, direct) if direct else router_selector(name)
    return [
        *router_rbac(name, namespace),
        router_deployment(name, namespace, spec, image),
        res.disruption_budget(name, namespace, router_name(name), router_selector(name), router_labels(name)),
        res.service_manifest(name, namespace, name, stable, "stable", labels=router_labels(name)),
        res.service_manifest(name, namespace, engines_service_name(name), res.pod_selector(name, serving_revision),
                             "engines", headless=True),
    ]
