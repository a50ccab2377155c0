"""kmock's KubernetesEmulator with the server-side behaviour our operator relies on (see KMOCK_NOTES.md).

Added here, never by bending the operator: server-assigned metadata (uid, resourceVersion, generation,
creationTimestamp), status-subresource separation, label selectors on lists, garbage collection
through ownerReferences, and one-shot 409 injection for conflict tests.
"""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import uuid
from typing import Any

import aiohttp.web
import kmock
from kmock._internal import enums, k8s
from kvpilot.operator.spec import GROUP, KIND, PLURAL, VERSION


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class Emulator(kmock.KubernetesEmulator):
    """Call `setup()` before serving."""

    def setup(self) -> None:
        self.resources.load_bundled()
        self.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
            kind=KIND,
            namespaced=True,
            verbs=["list", "watch", "get", "create", "patch", "update", "delete"],
            subresources=["status"],
        )
        self.rv = itertools.count(1)
        self.conflicts: collections.Counter[tuple[str, str, str | None]] = collections.Counter()
        self.conflicts_served: list[tuple[str, str, str | None]] = []
        self.writes: list[tuple[str, str, Any]] = []  # (method, path, body) of every write, for assertions

    def inject_conflicts(self, method: str, plural: str, times: int, subresource: str | None = None) -> None:
        """The next `times` matching requests get 409 Conflict without touching any object."""
        self.conflicts[(method.upper(), plural, subresource)] += times

    def find(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        for (resource, ns, obj_name), obj in self.objects.items():
            if resource.plural == plural and ns == namespace and obj_name == name and not obj.deleted:
                return dict(obj.raw)
        return None

    def all(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        return [
            dict(obj.raw)
            for (resource, ns, _), obj in self.objects.items()
            if resource.plural == plural and ns == namespace and not obj.deleted
        ]

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None:
            if request.method.value != "GET":
                self.writes.append((request.method.value, request.url.path, request.data))
            key = (request.method.value, request.resource.plural, request.subresource)
            if self.conflicts[key] > 0:
                self.conflicts[key] -= 1
                self.conflicts_served.append(key)
                raise k8s.KubernetesError(status=409, reason="Conflict", message="injected conflict")
            if request.action == enums.action.DELETE and request.name is not None:
                marked = await self._mark_for_deletion(request)
                if marked is not None:
                    return marked
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                self._on_create(request)
            elif request.action == enums.action.UPDATE and isinstance(request.data, dict):
                self._on_update(request)
        response = await super()._handle(request)
        if request.action in (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE):
            await self._collect_garbage()  # like the real collector: also catches children created late
        return response

    async def _mark_for_deletion(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        """An object with finalizers gets a deletionTimestamp and, as with any write, a new resourceVersion
        (kmock keeps the old one, and kopf then takes the event for one it has already seen)."""
        async with self._lock:
            for (resource, ns, name), obj in self.objects.items():
                if (resource, ns, name) != (request.resource, request.namespace, request.name) or obj.deleted:
                    continue
                meta = obj.raw.get("metadata") or {}
                if not meta.get("finalizers") or meta.get("deletionTimestamp"):
                    return None
                now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                obj.patch({"metadata": {"deletionTimestamp": now, "resourceVersion": str(next(self.rv))}})
                raw = dict(obj.raw)
                await self._buses[resource].put({"type": "MODIFIED", "object": raw})
                return aiohttp.web.json_response(raw)
        return None

    def _on_create(self, request: kmock.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        meta.setdefault("namespace", request.namespace)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        meta.update(
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self.rv)),
            generation=1,
            creationTimestamp=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    def _on_update(self, request: kmock.Request) -> None:
        current = self.find(request.resource.plural, request.namespace, request.name) or {}
        info = self.resources.get(request.resource)
        if request.subresource == "status":
            for k in [k for k in request.data if k not in ("status", "metadata")]:
                del request.data[k]
        elif info is not None and "status" in info.subresources:
            request.data.pop("status", None)
        meta = request.data.setdefault("metadata", {}) or {}
        request.data["metadata"] = meta
        meta["resourceVersion"] = str(next(self.rv))
        spec_changed = "spec" in request.data and request.data["spec"] != current.get("spec")
        if spec_changed and request.subresource is None:
            meta["generation"] = (current.get("metadata") or {}).get("generation", 1) + 1

    async def _collect_garbage(self) -> None:
        """Delete (in cascade) every object whose controller owner no longer exists."""
        while True:
            live_uids = {(obj.raw.get("metadata") or {}).get("uid") for obj in self.objects.values() if not obj.deleted}
            orphans = [
                (key, obj)
                for key, obj in self.objects.items()
                if not obj.deleted
                and any(
                    ref.get("uid") not in live_uids
                    for ref in (obj.raw.get("metadata") or {}).get("ownerReferences", [])
                )
            ]
            if not orphans:
                return
            for (resource, _, _), obj in orphans:
                raw = dict(obj.raw)
                obj.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            payload["items"] = [
                i
                for i in payload["items"]
                if _selector_matches(selector, (i.get("metadata") or {}).get("labels") or {})
            ]
        return payload

    def versions(self, plural: str, namespace: str, name: str) -> list[dict[str, Any]]:
        """Every stored version of one object, oldest first (deletions skipped)."""
        for (resource, ns, obj_name), obj in self.objects.items():
            if resource.plural == plural and ns == namespace and obj_name == name:
                return [dict(v) for v in obj.history if v is not None]
        return []
