"""The e2e API server (kmock plus real-server behaviour), with what the operator's tests assert on:
one-shot 409 injection, a record of every write, and direct reads of stored objects."""

from __future__ import annotations

import collections
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import k8s

from e2e.apiserver import ApiServer


class Emulator(ApiServer):
    """Call `setup()` before serving."""

    def setup(self) -> None:
        super().setup()
        self.conflicts: collections.Counter[tuple[str, str, str | None]] = collections.Counter()
        self.conflicts_served: list[tuple[str, str, str | None]] = []
        self.writes: list[tuple[str, str, Any]] = []  # (method, path, body) of every write, for assertions
        self.requests: list[tuple[str, str, str]] = []  # (method, path, query) of every API request

    def inject_conflicts(self, method: str, plural: str, times: int, subresource: str | None = None) -> None:
        """The next `times` matching requests get 409 Conflict without touching any object."""
        self.conflicts[(method.upper(), plural, subresource)] += times

    def find(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self._live(plural, namespace, name)

    def all(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        return [
            dict(obj.raw)
            for (resource, ns, _), obj in self.objects.items()
            if resource.plural == plural and ns == namespace and not obj.deleted
        ]

    def versions(self, plural: str, namespace: str, name: str) -> list[dict[str, Any]]:
        """Every stored version of one object, oldest first (deletions skipped)."""
        for (resource, ns, obj_name), obj in self.objects.items():
            if resource.plural == plural and ns == namespace and obj_name == name:
                return [dict(v) for v in obj.history if v is not None]
        return []

    def passes(self, name: str) -> int:
        """Reconcile passes so far over one InferenceService: each starts by reading it fresh."""
        path = f"/apis/kvpilot.dev/v1alpha1/namespaces/default/inferenceservices/{name}"
        return sum(method == "GET" and p == path and "watch" not in q for method, p, q in self.requests)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        self.requests.append((request.method.value, request.url.path, request.url.query_string))
        if request.resource is not None:
            if request.method.value != "GET":
                self.writes.append((request.method.value, request.url.path, request.data))
            key = (request.method.value, request.resource.plural, request.subresource)
            if self.conflicts[key] > 0:
                self.conflicts[key] -= 1
                self.conflicts_served.append(key)
                raise k8s.KubernetesError(status=409, reason="Conflict", message="injected conflict")
        return await super()._handle(request)
