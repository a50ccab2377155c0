"""kmock's KubernetesEmulator with the server-side behaviour a real API server has and the operator needs.

kmock stores objects as plain dicts (see /work/shared/KMOCK_NOTES.md). Added here: server-assigned
metadata (uid, resourceVersion, generation, creationTimestamp), status-subresource separation,
equality label selectors on lists, deletion marking of objects with finalizers, and garbage collection
through ownerReferences. The operator's tests extend it (tests/operator/emulator.py).
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml
from kmock._internal import enums
from kvpilot.operator.spec import GROUP, KIND, PLURAL, VERSION


def _timestamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def selector_matches(selector: dict[str, str], labels: dict[str, str] | None) -> bool:
    return selector.items() <= (labels or {}).items()


def _parse_selector(text: str) -> dict[str, str]:
    """Equality selectors only (`a=b,c=d`): all the operator and the harness use."""
    pairs = [term.partition("=") for term in filter(None, text.split(","))]
    if any(not sep or key.endswith("!") for key, sep, _ in pairs):
        raise ValueError(f"unsupported label selector {text!r}: only equality terms")
    return {key: value.removeprefix("=") for key, _, value in pairs}


class ApiServer(kmock.KubernetesEmulator):
    """Call `setup()` before serving."""

    def setup(self) -> None:
        self.resources.load_bundled()
        self.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
            kind=KIND,
            namespaced=True,
            verbs=["list", "watch", "get", "create", "patch", "update", "delete"],
            subresources=["status"],
        )
        self._rv = itertools.count(1)

    def _live(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        for (resource, ns, obj_name), obj in self.objects.items():
            if (resource.plural, ns, obj_name) == (plural, namespace, name) and not obj.deleted:
                return dict(obj.raw)
        return None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None:
            if request.action == enums.action.DELETE and request.name is not None:
                marked = await self._mark_for_deletion(request)
                if marked is not None:
                    return marked
            if isinstance(request.data, dict):
                if request.action == enums.action.CREATE:
                    self._assign_metadata(request)
                elif request.action == enums.action.UPDATE:
                    self._bump_versions(request)
        response = await super()._handle(request)
        if request.resource is not None and request.action in (
            enums.action.CREATE,
            enums.action.UPDATE,
            enums.action.DELETE,
        ):
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
                obj.patch({"metadata": {"deletionTimestamp": _timestamp(), "resourceVersion": str(next(self._rv))}})
                raw = dict(obj.raw)
                await self._buses[resource].put({"type": "MODIFIED", "object": raw})
                return aiohttp.web.json_response(raw)
        return None

    def _assign_metadata(self, request: kmock.Request) -> None:
        meta = request.data.setdefault("metadata", {})
        meta.setdefault("namespace", request.namespace)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        meta.update(
            uid=str(uuid.uuid4()), resourceVersion=str(next(self._rv)), generation=1, creationTimestamp=_timestamp()
        )

    def _bump_versions(self, request: kmock.Request) -> None:
        """Writes to /status touch only status; writes to the object never touch status (if it has one)."""
        assert request.resource is not None and request.name is not None
        current = self._live(request.resource.plural, request.namespace or "", request.name) or {}
        info = self.resources.get(request.resource)
        if request.subresource == "status":
            for key in [k for k in request.data if k not in ("status", "metadata")]:
                del request.data[key]
        elif info is not None and "status" in info.subresources:
            request.data.pop("status", None)
        meta = request.data.get("metadata") or {}
        request.data["metadata"] = meta
        meta["resourceVersion"] = str(next(self._rv))
        if request.subresource is None and "spec" in request.data:
            merged = {**(current.get("spec") or {}), **request.data["spec"]}
            if merged != current.get("spec"):
                meta["generation"] = int((current.get("metadata") or {}).get("generation", 1)) + 1

    async def _collect_garbage(self) -> None:
        """Delete, in cascade, every object one of whose owners is gone (background propagation)."""
        while True:
            live = {(obj.raw.get("metadata") or {}).get("uid") for obj in self.objects.values() if not obj.deleted}
            orphans = [
                (resource, obj)
                for (resource, _, _), obj in self.objects.items()
                if not obj.deleted
                and any(
                    ref.get("uid") not in live for ref in (obj.raw.get("metadata") or {}).get("ownerReferences", [])
                )
            ]
            if not orphans:
                return
            async with self._lock:
                for resource, obj in orphans:
                    raw = dict(obj.raw)
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})

    async def _serve_list(self, request: kmock.Request) -> Any:
        payload = await super()._serve_list(request)
        text = request.params.get("labelSelector")
        if text:
            selector = _parse_selector(text)
            payload["items"] = [
                i for i in payload["items"] if selector_matches(selector, (i.get("metadata") or {}).get("labels"))
            ]
        return payload


def write_kubeconfig(path: Path, server_url: str, namespace: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "e2e",
        "clusters": [{"name": "e2e", "cluster": {"server": server_url}}],
        "users": [{"name": "e2e", "user": {"token": "e2e"}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e", "namespace": namespace}}],
    }
    path.write_text(yaml.safe_dump(config))
    return path
