"""What the operator knows of its children: kopf's watch-fed indexes (main.py), one view per InferenceService.

Every kind the operator writes or reads back (Deployments, Services, ConfigMaps, PDBs, ServiceMonitors, the
routers' ServiceAccount, Role and RoleBinding, load Jobs, and the Pods of all of them) is watched and indexed
by the InferenceService it belongs to, so a quiet pass asks the API server nothing about them: the index is
current as of the last watch event, and a change to a Deployment, Job or Pod starts a pass at once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

MANAGED_BY = {"app.kubernetes.io/managed-by": "kvpilot"}
# kind -> (kopf resource selector, index name); the same names are the handlers' keyword arguments.
INDEXED: dict[str, tuple[str, str]] = {
    "Deployment": ("deployments.v1.apps", "deployment_index"),
    "Service": ("services.v1", "service_index"),
    "ServiceAccount": ("serviceaccounts.v1", "serviceaccount_index"),
    "ConfigMap": ("configmaps.v1", "configmap_index"),
    "PodDisruptionBudget": ("poddisruptionbudgets.v1.policy", "pdb_index"),
    "Role": ("roles.v1.rbac.authorization.k8s.io", "role_index"),
    "RoleBinding": ("rolebindings.v1.rbac.authorization.k8s.io", "rolebinding_index"),
    "ServiceMonitor": ("servicemonitors.v1.monitoring.coreos.com", "servicemonitor_index"),
    "Job": ("jobs.v1.batch", "job_index"),
    "Pod": ("pods.v1", "pod_index"),
}
OWNER_LABELS = ("kvpilot.dev/inferenceservice", "kvpilot.dev/tuning-of")  # engine children; load Jobs and pods


def owner_of(labels: Mapping[str, str] | None) -> str | None:
    """The InferenceService a child belongs to, by the label every child carries."""
    return next((labels[k] for k in OWNER_LABELS if labels and labels.get(k)), None)


def index_entry(namespace: str | None, body: Mapping[str, Any]) -> dict[tuple[str | None, str], dict[str, Any]]:
    """What an index keeps of one watched object: a copy of it, under (namespace, its InferenceService)."""
    owner = owner_of((body.get("metadata") or {}).get("labels"))
    return {} if owner is None else {(namespace, owner): copy.deepcopy(dict(body))}


class Children:
    """One InferenceService's children by kind, as the indexes hold them (kopf.Index: key -> Store)."""

    def __init__(self, indexes: Mapping[str, Any], namespace: str, name: str) -> None:
        self._by_kind: dict[str, list[dict[str, Any]]] = {}
        for kind, (_, index) in INDEXED.items():
            store: Iterable[dict[str, Any]] = (indexes.get(index) or {}).get((namespace, name), ())
            self._by_kind[kind] = list(store)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self._by_kind[kind] if o["metadata"]["name"] == name), None)

    def list(self, kind: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        return [o for o in self._by_kind[kind] if labels.items() <= (o["metadata"].get("labels") or {}).items()]
