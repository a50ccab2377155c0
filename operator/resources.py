"""Desired state as pure functions: (name, spec, revision) -> manifests. No I/O, so plain unit tests cover it.

A *revision* is a short hash of everything that goes into the pod template (model, engine, resources):
changing any of it makes a new revision, which the rollout brings up beside the serving one.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from kvpilot.engine.flags import to_flags
from kvpilot.operator.engine_knobs import chosen_knobs, knob_args, knob_names
from kvpilot.operator.spec import InferenceServiceSpec

PORT = 8000
MODEL_MOUNT = "/mnt/model"
PRESTOP_SLEEP_SECONDS = 5
GRACE_MARGIN_SECONDS = 10
# Weights can take many minutes to load; the rollout's readyTimeoutSeconds decides when to give up.
STARTUP_FAILURES = 180
LABEL_REVISION = "kvpilot.dev/revision"
LABEL_ISVC = "kvpilot.dev/inferenceservice"
# The revision's ConfigMap keeps the spec it was built from, so it can be rebuilt after the spec moved on.
SPEC_KEY = "spec.json"
QUANTITY_SUFFIXES = {
    "m": 1e-3, "k": 1e3, "Ki": 2**10, "M": 1e6, "Mi": 2**20, "G": 1e9, "Gi": 2**30, "T": 1e12, "Ti": 2**40
}


def _revision_inputs(spec: InferenceServiceSpec) -> dict[str, Any]:
    """Unset fields are left out and knobs count only where they differ from the engine's defaults (as the pod's
    arguments do), so a knob added to the engine later, or set to its default, moves no revision."""
    engine = spec.engine.model_copy(update={k: None for k in knob_names() if k not in chosen_knobs(spec.engine)})
    inputs = spec.model_copy(update={"engine": engine})
    return inputs.model_dump(mode="json", by_alias=True, include={"model", "engine", "resources"}, exclude_none=True)


def revision_of(spec: InferenceServiceSpec) -> str:
    return hashlib.sha256(json.dumps(_revision_inputs(spec), sort_keys=True).encode()).hexdigest()[:10]


def base_labels(name: str) -> dict[str, str]:
    """Labels every child carries; selecting on them finds all revisions of one InferenceService."""
    return {
        "app.kubernetes.io/name": "kvpilot-engine",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "engine",
        "app.kubernetes.io/managed-by": "kvpilot",
        LABEL_ISVC: name,
    }


def pod_selector(name: str, revision: str | None = None) -> dict[str, str]:
    selector = {"app.kubernetes.io/instance": name, LABEL_ISVC: name}
    if revision is not None:
        selector[LABEL_REVISION] = revision
    return selector


def revision_labels(name: str, revision: str) -> dict[str, str]:
    return {**base_labels(name), LABEL_REVISION: revision}


# The labels every engine series carries in Prometheus, set by the scrape configuration from the pod's metadata
# (the ServiceMonitor's relabelings below; e2e/prometheus.py), never by what the pod reports about itself.
SERIES_LABELS = {"namespace": "__meta_kubernetes_namespace",
                 "inferenceservice": "__meta_kubernetes_pod_label_kvpilot_dev_inferenceservice",
                 "revision": "__meta_kubernetes_pod_label_kvpilot_dev_revision"}


def series_labels(namespace: str, name: str, revision: str) -> dict[str, str]:
    """What every query filters on: the tenant (namespace, InferenceService) and the revision."""
    return {"namespace": namespace, "inferenceservice": name, "revision": revision}


def deployment_name(name: str, revision: str) -> str:
    return f"{name}-{revision}"


def preview_service_name(name: str) -> str:
    return f"{name}-preview"


def metrics_service_name(name: str) -> str:
    return f"{name}-metrics"


def model_source(spec: InferenceServiceSpec) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(path given to --model, volumes, mounts) for the model's URI scheme."""
    uri = spec.model.uri
    if uri == "demo" or (uri.startswith("/") and not uri.startswith("//")):
        return uri, [], []
    mount = {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}
    if uri.startswith("pvc://"):
        claim, _, sub = uri.removeprefix("pvc://").partition("/")
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        return f"{MODEL_MOUNT}/{sub}".rstrip("/"), [volume], [mount]
    host_path = uri.removeprefix("hostpath://")
    volume = {"name": "model", "hostPath": {"path": host_path, "type": "Directory"}}
    return MODEL_MOUNT, [volume], [mount]


def engine_args(spec: InferenceServiceSpec, revision: str, model_path: str) -> list[str]:
    """`kvpilot serve` flags, each flag and its value one argument (`--model=-x` stays a value): what the
    operator sets (ENGINE_ONLY), the knobs set in spec.engine, the server's own, then extraArgs."""
    own = {"model": model_path, "served_model_name": spec.model.name, "revision": revision}
    server = ["--host=0.0.0.0", f"--port={PORT}", f"--drain-timeout={spec.engine.drain_timeout_seconds}"]
    return [*to_flags(own), *knob_args(spec.engine), *server, *spec.engine.extra_args]


# The Kubernetes "restricted" Pod Security Standard, for engine and load-Job pods alike: non-root (the images
# run as UID 10001), no privilege escalation, no capabilities, the runtime's default seccomp profile, and a
# read-only root filesystem with an emptyDir for what the process writes (/tmp: kernel caches, logs).
RUN_AS_USER = 10001
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
}
SCRATCH_VOLUME = {"name": "tmp", "emptyDir": {}}
SCRATCH_MOUNT = {"name": "tmp", "mountPath": "/tmp"}
SCRATCH_ENV = [{"name": "TRITON_CACHE_DIR", "value": "/tmp/triton"}, {"name": "HF_HOME", "value": "/tmp/hf"}]


def service_account_name(name: str) -> str:
    return f"{name}-engine"


def service_account(name: str, namespace: str) -> dict[str, Any]:
    """The engine's and load Jobs' own identity: granted nothing, and its token is never mounted."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
            "metadata": {"name": service_account_name(name), "namespace": namespace, "labels": base_labels(name)}}


def restricted_pod(name: str, pod_spec: dict[str, Any], account: str | None = None,
                   api_token: bool = False) -> dict[str, Any]:
    """`pod_spec` under the restricted standard, as `account` (default: the engine's ServiceAccount, granted nothing),
    with its API token mounted only if the pod talks to the API server (`api_token`: the router)."""
    for container in pod_spec["containers"]:
        container["securityContext"] = dict(CONTAINER_SECURITY_CONTEXT)
        container["volumeMounts"] = [*container.get("volumeMounts", []), SCRATCH_MOUNT]
        container["env"] = [*container.get("env", []), *SCRATCH_ENV]
    return {**pod_spec, "securityContext": dict(POD_SECURITY_CONTEXT),
            "serviceAccountName": account or service_account_name(name), "automountServiceAccountToken": api_token,
            "volumes": [*pod_spec.get("volumes", []), SCRATCH_VOLUME]}


def _container_resources(spec: InferenceServiceSpec) -> dict[str, Any]:
    r = spec.resources
    requests: dict[str, Any] = {"cpu": str(r.cpu), "memory": str(r.memory)}
    limits: dict[str, Any] = {"cpu": str(r.cpu), "memory": str(r.memory)}
    if r.gpus_per_replica:
        requests["nvidia.com/gpu"] = str(r.gpus_per_replica)
        limits["nvidia.com/gpu"] = str(r.gpus_per_replica)
    return {"requests": requests, "limits": limits}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def cpu_threads(cpu: int | str) -> int:
    """Whole CPUs in a request (`500m` -> 1, `2.5` -> 3): torch otherwise sizes its thread pools by the node's
    cores, not the pod's share, and oversubscribed spinning threads stall every process on the node."""
    number, suffix = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(cpu)).groups()  # type: ignore[union-attr]
    return max(1, math.ceil(float(number) * QUANTITY_SUFFIXES.get(suffix, 1)))


def pod_template(name: str, spec: InferenceServiceSpec, revision: str) -> dict[str, Any]:
    model_path, volumes, mounts = model_source(spec)
    env: list[dict[str, Any]] = [{"name": "OMP_NUM_THREADS", "value": str(cpu_threads(spec.resources.cpu))}]
    if spec.engine.api_key_secret:
        key_ref = {"name": spec.engine.api_key_secret, "key": "api-key"}
        env.append({"name": "KVPILOT_API_KEY", "valueFrom": {"secretKeyRef": key_ref}})
    container = {
        "name": "engine",
        "image": spec.engine.image,
        "command": ["kvpilot", "serve"],
        "args": engine_args(spec, revision, model_path),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": _container_resources(spec),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, *mounts],
        "startupProbe": _probe("/health", 10, STARTUP_FAILURES),
        "readinessProbe": _probe("/ready", 5, 2),
        "livenessProbe": _probe("/health", 10, 3),
        # Endpoints drop the pod while it sleeps, then SIGTERM starts the engine's drain.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_SECONDS)]}}},
    }
    grace = spec.engine.drain_timeout_seconds + PRESTOP_SLEEP_SECONDS + GRACE_MARGIN_SECONDS
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": grace,
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}}, *volumes],
        "nodeSelector": dict(spec.resources.node_selector),
        "tolerations": list(spec.resources.tolerations),
    }
    if spec.resources.affinity:
        pod_spec["affinity"] = spec.resources.affinity
    return {"metadata": {"labels": revision_labels(name, revision)}, "spec": restricted_pod(name, pod_spec)}


def deployment(name: str, namespace: str, spec: InferenceServiceSpec, revision: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(name, revision),
            "namespace": namespace,
            "labels": revision_labels(name, revision),
            "annotations": {"kvpilot.dev/model-revision": spec.model.revision},
        },
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": pod_selector(name, revision)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": pod_template(name, spec, revision),
        },
    }


def engine_config_map(name: str, namespace: str, spec: InferenceServiceSpec, revision: str) -> dict[str, Any]:
    """The revision's engine configuration, kept beside it: what ran, for people and for the tuner."""
    config = {
        "revision": revision,
        "model": spec.model.model_dump(mode="json", by_alias=True),
        "engine": spec.engine.model_dump(mode="json", by_alias=True, exclude_none=True),
        "args": engine_args(spec, revision, model_source(spec)[0]),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": deployment_name(name, revision),
            "namespace": namespace,
            "labels": revision_labels(name, revision),
        },
        "data": {
            "engine.json": json.dumps(config, indent=2, sort_keys=True),
            SPEC_KEY: json.dumps(_revision_inputs(spec), sort_keys=True),
        },
    }


def service_manifest(name: str, namespace: str, service_name: str, selector: dict[str, str], role: str,
                     headless: bool = False, annotations: dict[str, str] | None = None,
                     labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A Service of ours: port 8000 to the selected pods' container port named http."""
    spec: dict[str, Any] = {"clusterIP": "None"} if headless else {"type": "ClusterIP"}
    spec.update(selector=selector, ports=[{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}])
    metadata: dict[str, Any] = {"name": service_name, "namespace": namespace,
                                "labels": {**(labels or base_labels(name)), "kvpilot.dev/role": role}}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}


def service(name: str, namespace: str, service_name: str, revision: str, role: str) -> dict[str, Any]:
    """A Service selecting one revision's engine pods (preview, tuning)."""
    return service_manifest(name, namespace, service_name, pod_selector(name, revision), role)


def metrics_service(name: str, namespace: str, scrape_annotations: bool) -> dict[str, Any]:
    """Headless, over every pod of the InferenceService (each revision's engines, candidates included, and the
    routers): Prometheus scrapes each pod once. Every one serves /metrics on the port named http (8000)."""
    annotations = (
        {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}
        if scrape_annotations
        else {}
    )
    return service_manifest(name, namespace, metrics_service_name(name), pod_selector(name), "metrics",
                            headless=True, annotations=annotations)


def service_monitor(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": name, "namespace": namespace, "labels": base_labels(name)},
        "spec": {
            "selector": {"matchLabels": {LABEL_ISVC: name, "kvpilot.dev/role": "metrics"}},
            "endpoints": [{
                "port": "http", "path": "/metrics", "interval": "15s", "honorLabels": False,
                "relabelings": [{"sourceLabels": [source], "targetLabel": target, "action": "replace"}
                                for target, source in SERIES_LABELS.items()],
            }],
        },
    }


def disruption_budget(name: str, namespace: str, pdb_name: str, selector: dict[str, str],
                      labels: dict[str, str] | None = None) -> dict[str, Any]:
    """At most one of the selected pods down at a time by a voluntary disruption (a drain, an upgrade)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": pdb_name, "namespace": namespace, "labels": labels or base_labels(name)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}},
    }


def pod_disruption_budget(name: str, namespace: str) -> dict[str, Any]:
    """The engines' budget, across revisions; the routers have their own (two budgets on one pod block evictions)."""
    return disruption_budget(name, namespace, name, {**pod_selector(name), "app.kubernetes.io/component": "engine"})


def shared_children(name: str, namespace: str, preview_revision: str, service_monitors: bool) -> list[dict[str, Any]]:
    """Engine children that outlive revisions: the ServiceAccount, the preview and metrics Services, the PDB, the
    ServiceMonitor. (The stable Service selects the routers: router_resources.py.)"""
    children = [
        service_account(name, namespace),
        service(name, namespace, preview_service_name(name), preview_revision, "preview"),
        metrics_service(name, namespace, scrape_annotations=not service_monitors),
        pod_disruption_budget(name, namespace),
    ]
    if service_monitors:
        children.append(service_monitor(name, namespace))
    return children


def revision_children(name: str, namespace: str, spec: InferenceServiceSpec, revision: str) -> list[dict[str, Any]]:
    return [engine_config_map(name, namespace, spec, revision), deployment(name, namespace, spec, revision)]


def deployment_ready(obj: dict[str, Any] | None) -> bool:
    """Ready = the controller saw this generation and every desired replica is updated and available."""
    if not obj:
        return False
    want = obj.get("spec", {}).get("replicas", 1)
    status = obj.get("status") or {}
    seen = status.get("observedGeneration", 0) >= obj.get("metadata", {}).get("generation", 0)
    ready = min(status.get("updatedReplicas", 0), status.get("availableReplicas", 0), status.get("readyReplicas", 0))
    return seen and ready >= want
