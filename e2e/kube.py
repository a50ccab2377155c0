"""The harness's own async API client (what kubectl and the kubelet would be), over httpx."""

from __future__ import annotations

from typing import Any

import httpx

PATHS = {
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "InferenceService": "/apis/kvpilot.dev/v1alpha1/namespaces/{ns}/inferenceservices",
    "Event": "/api/v1/namespaces/{ns}/events",
}
MERGE = {"Content-Type": "application/merge-patch+json"}


class ApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status


class Kube:
    def __init__(self, server_url: str, namespace: str) -> None:
        self.namespace = namespace
        self.http = httpx.AsyncClient(base_url=server_url, timeout=10, headers={"Authorization": "Bearer e2e"})

    async def close(self) -> None:
        await self.http.aclose()

    def _path(self, kind: str, name: str | None = None, sub: str | None = None) -> str:
        path = PATHS[kind].format(ns=self.namespace)
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise ApiError(response.status_code, response.text)
        return response.json() if response.content else {}

    async def list(self, kind: str, labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else {}
        return (await self._call("GET", self._path(kind), params=params)).get("items", [])

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", self._path(kind, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", self._path(kind), json=body)

    async def patch(self, kind: str, name: str, patch: dict[str, Any], sub: str | None = None) -> dict[str, Any]:
        return await self._call("PATCH", self._path(kind, name, sub), json=patch, headers=MERGE)

    async def delete(self, kind: str, name: str) -> bool:
        """Background propagation, as kubectl sends it (a batch/v1 Job's server default orphans its pods)."""
        try:
            await self._call("DELETE", self._path(kind, name), params={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True
