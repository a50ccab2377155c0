"""A small JSON client for the Kubernetes API: dicts in, dicts out, over httpx.

The operator handles every child kind the same way (get, list by label, create, merge-patch,
delete), so one generic client over REST paths beats a typed client per kind. Credentials come
from the in-cluster service account or KUBECONFIG, loaded by the `kubernetes` package.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import httpx
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config


@dataclasses.dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        root = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        path = f"{root}/namespaces/{namespace}/{self.plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path


CONFIG_MAP = Kind("v1", "ConfigMap", "configmaps")
SERVICE = Kind("v1", "Service", "services")
SECRET = Kind("v1", "Secret", "secrets")
DEPLOYMENT = Kind("apps/v1", "Deployment", "deployments")
JOB = Kind("batch/v1", "Job", "jobs")
POD = Kind("v1", "Pod", "pods")
PDB = Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets")
SERVICE_MONITOR = Kind("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors")
INFERENCE_SERVICE = Kind("kvpilot.dev/v1alpha1", "InferenceService", "inferenceservices")
KINDS = {k.kind: k for k in (CONFIG_MAP, SERVICE, DEPLOYMENT, JOB, POD, PDB, SERVICE_MONITOR, INFERENCE_SERVICE)}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _load_configuration() -> k8s_client.Configuration:
    cfg = k8s_client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        k8s_config.load_incluster_config(client_configuration=cfg)
    else:
        # KUBECONFIG is read here, not at import time as the kubernetes package's default does.
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
        k8s_config.load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
    return cfg


class KubeClient:
    def __init__(self, configuration: k8s_client.Configuration | None = None, timeout: float = 30.0) -> None:
        self._cfg = configuration or _load_configuration()
        verify: Any = self._cfg.ssl_ca_cert or bool(self._cfg.verify_ssl)
        cert = (self._cfg.cert_file, self._cfg.key_file) if self._cfg.cert_file else None
        self._http = httpx.Client(base_url=self._cfg.host, verify=verify, cert=cert, timeout=timeout)

    def connection_info(self) -> dict[str, Any]:
        """The same credentials, in the shape of kopf.ConnectionInfo's keyword arguments."""
        token = self._cfg.get_api_key_with_prefix("authorization") or ""
        return {
            "server": self._cfg.host,
            "ca_path": self._cfg.ssl_ca_cert,
            "insecure": not self._cfg.verify_ssl,
            "scheme": "Bearer" if token else None,
            "token": token.removeprefix("Bearer ") or None,
            "certificate_path": self._cfg.cert_file,
            "private_key_path": self._cfg.key_file,
        }

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        headers = {"Accept": "application/json", **kwargs.pop("headers", {})}
        token = self._cfg.get_api_key_with_prefix("authorization") or self._cfg.get_api_key_with_prefix("BearerToken")
        if token:
            headers["Authorization"] = token
        response = self._http.request(method, path, headers=headers, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise ApiError(response.status_code, f"{method} {path}: {message}")
        return response.json() if response.content else {}

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._request("GET", kind.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: Kind, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        items = self._request("GET", kind.path(namespace), params={"labelSelector": selector}).get("items", [])
        # Filtered here too: the selector is a contract we rely on for deletions, so do not trust blindly.
        return [i for i in items if labels.items() <= (i.get("metadata", {}).get("labels") or {}).items()]

    def create(self, kind: Kind, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", kind.path(namespace), json=body)

    def patch(
        self, kind: Kind, namespace: str, name: str, patch: dict[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
        """JSON merge patch: dicts merge, lists are replaced whole (we always send whole lists)."""
        headers = {"Content-Type": "application/merge-patch+json"}
        return self._request("PATCH", kind.path(namespace, name, subresource), json=patch, headers=headers)

    def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        """Background propagation, so the owned ReplicaSets and Pods go too; False if already gone."""
        try:
            self._request("DELETE", kind.path(namespace, name), params={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def has_resource(self, kind: Kind) -> bool:
        """Whether the cluster serves this kind (e.g. ServiceMonitor needs the Prometheus operator's CRD)."""
        try:
            listing = self._request("GET", f"/apis/{kind.api_version}")
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == kind.plural for r in listing.get("resources", []))
