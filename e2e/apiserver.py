"""kmock's KubernetesEmulator with the server-side behaviour a real API server has and the operator needs.

kmock stores objects as plain dicts (see /work/shared/KMOCK_NOTES.md). Added here: server-assigned
metadata (uid, resourceVersion, generation, creationTimestamp), server-side apply and the field ownership
behind it (e2e/ssa.py), status-subresource separation,
equality label selectors on lists, deletion marking of objects with finalizers, garbage collection
through ownerReferences (`propagationPolicy` Orphan strips the ownerReferences instead), and for batch/v1
Jobs what their API does server-side: the defaulted selector and pod-template labels, an immutable
template, and orphaning as the default on DELETE. The operator's tests extend it (tests/operator/emulator.py).
"""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import uuid
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import enums, k8s
from kmock._internal.dicts import merge_patch_dict
from kvpilot.operator.crd import crd_manifest
from kvpilot.operator.spec import GROUP, KIND, PLURAL, VERSION

from e2e import crdserver, ssa
from e2e.crdapi import CustomResourceHandling

JOB_RESOURCE = ("batch", "v1", "jobs")
REQUEST_LOG = 64


def _is_job(resource: Any) -> bool:
    return resource is not None and (resource.group, resource.version, resource.plural) == JOB_RESOURCE


def _timestamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiServer(CustomResourceHandling, kmock.KubernetesEmulator):
    """Call `setup()` before serving."""

    def setup(self) -> None:
        self.resources.load_bundled()
        names = crd_manifest()["spec"]["names"]
        self.resources[f"{GROUP}/{VERSION}/{PLURAL}"] = kmock.ResourceInfo(
            kind=KIND,
            singular=names["singular"],
            shortnames=names["shortNames"],
            categories=names["categories"],
            namespaced=True,
            verbs=["list", "watch", "get", "create", "patch", "update", "delete"],
            subresources=["status"],
        )
        self._rv = itertools.count(1)
        self.validation = True  # the CRD's structural schema on writes; off, like a cluster that skips it
        self.calls: collections.Counter[tuple[str, str, str, str]] = collections.Counter()  # (agent, group, res, verb)

    def _live(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        for (resource, ns, obj_name), obj in self.objects.items():
            if (resource.plural, ns, obj_name) == (plural, namespace, name) and not obj.deleted:
                return dict(obj.raw)
        return None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # kmock keeps every request it served and matches each new one against its reactions by walking that
        # whole log: a request costs time in proportion to all before it (0.3 s after ~1,500 in a long run).
        # Nothing here reads the log, so only the newest entries are kept (the current request among them).
        del self._requests[:-REQUEST_LOG]
        document = {"/openapi/v3": crdserver.openapi_root,
                    f"/openapi/v3/{crdserver.GROUP_VERSION_PATH}": crdserver.openapi_group_version}
        if request.url.path in document:
            return aiohttp.web.json_response(document[request.url.path]())
        warnings: list[str] = []
        self._count(request)
        if request.resource is not None:
            if request.action == enums.action.UPDATE and _is_apply(request):
                applied = self._apply(request)
                if not isinstance(applied, kmock.Request):
                    return applied
                self._requests[self._requests.index(request)] = request = applied  # kmock matches on its log
            if self._admitted(request) and isinstance(request.data, dict):
                admitted = self._admit(request, warnings)
                if not isinstance(admitted, kmock.Request):
                    return admitted
                self._requests[self._requests.index(request)] = request = admitted
            if request.action == enums.action.DELETE and request.name is not None:
                marked = await self._mark_for_deletion(request)
                if marked is not None:
                    return marked
                if _propagation(request) == "Orphan":
                    await self._orphan_dependents(request)
            if isinstance(request.data, dict):
                if request.action == enums.action.CREATE:
                    self._assign_metadata(request)
                    if _is_job(request.resource):
                        _default_job(request.data)
                    if "managedFields" not in request.data["metadata"]:
                        request.data["metadata"]["managedFields"] = ssa.record_write(
                            None, request.data, _manager(request), None)
                elif request.action == enums.action.UPDATE:
                    if _is_job(request.resource) and request.subresource is None:
                        self._check_job_immutable(request)
                    self._bump_versions(request)
                    self._record_ownership(request)
        response = await super()._handle(request)
        if request.resource is not None and request.action in (
            enums.action.CREATE,
            enums.action.UPDATE,
            enums.action.DELETE,
        ):
            await self._collect_garbage()  # like the real collector: also catches children created late
        for warning in warnings:
            response.headers.add("Warning", f'299 - "{warning}"')
        return response

    def _count(self, request: kmock.Request) -> None:
        """The API calls each client made, as RBAC names them (an apply that creates is also a create)."""
        if request.resource is None or request.resource.plural is None:  # discovery: open to every client
            return
        agent = request.headers.get("User-Agent", "").split("/", 1)[0]
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        method = request.method.value
        if method == "GET":
            verb = "watch" if request.params.get("watch") in ("true", "1") else "get" if request.name else "list"
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method)
        self.calls[(agent, request.resource.group or "", resource, verb)] += 1
        if _is_apply(request) and request.subresource is None and request.name is not None \
                and self._live(request.resource.plural, request.namespace or "", request.name) is None:
            self.calls[(agent, request.resource.group or "", resource, "create")] += 1

    def _apply(self, request: kmock.Request) -> aiohttp.web.StreamResponse | kmock.Request:
        """Server-side apply (e2e/ssa.py): a conflict is answered here, a no-op apply returns the object as it
        is (no new resourceVersion, no watch event); otherwise the request goes on as a create, or as the
        merge patch that turns the object into the applied result."""
        assert request.resource is not None and request.name is not None
        manager = request.params.get("fieldManager")
        if not manager:
            raise k8s.KubernetesError(status=400, reason="BadRequest", message="PatchOptions.meta.k8s.io \"\" is "
                                      "invalid: fieldManager: Required value: is required for apply patch")
        config = request.data if isinstance(request.data, dict) else yaml.safe_load(request.text or "{}")
        current = self._live(request.resource.plural, request.namespace or "", request.name)
        if current is None and request.subresource is not None:
            raise k8s.KubernetesError(status=404, reason="NotFound", message=f'"{request.name}" not found')
        try:
            new = ssa.apply(current, config, manager, request.params.get("force") == "true", request.subresource)
        except ssa.ApplyConflict as exc:
            causes = [{"reason": "FieldManagerConflict", "message": f'conflict with "{m}"', "field": f}
                      for m, f in exc.conflicts]
            raise k8s.KubernetesError(status=409, reason="Conflict", message=str(exc), details={"causes": causes}
                                      ) from None
        if current is None:
            new["metadata"].update(name=request.name, namespace=request.namespace)
            return attrs.evolve(request, action=enums.action.CREATE, method="POST", name=None, data=new)
        diff = ssa.merge_diff(current, new)
        if not diff or (set(diff) == {"metadata"} and set(diff["metadata"]) == {"managedFields"}
                        and _same_fields(current, new)):
            return aiohttp.web.json_response(current)
        return attrs.evolve(request, data=diff)

    def _record_ownership(self, request: kmock.Request) -> None:
        """A write that is not an apply: its manager now owns the fields it changed."""
        assert request.resource is not None and request.name is not None
        meta = request.data.get("metadata") or {}
        if _is_apply(request) or "managedFields" in meta:  # accounted for by the apply or the writer
            return
        current = self._live(request.resource.plural, request.namespace or "", request.name)
        if current is None:
            return
        new = merge_patch_dict(current, request.data)
        meta["managedFields"] = ssa.record_write(current, dict(new), _manager(request), request.subresource)
        request.data["metadata"] = meta

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

    async def _orphan_dependents(self, request: kmock.Request) -> None:
        """What the garbage collector does for propagationPolicy Orphan: dependents lose their ownerReference
        to the deleted object (and live on)."""
        assert request.resource is not None and request.name is not None
        owner = self._live(request.resource.plural, request.namespace or "", request.name)
        uid = ((owner or {}).get("metadata") or {}).get("uid")
        if uid is None:
            return
        async with self._lock:
            for (resource, _, _), obj in self.objects.items():
                refs = (obj.raw.get("metadata") or {}).get("ownerReferences") or []
                kept = [ref for ref in refs if ref.get("uid") != uid]
                if obj.deleted or len(kept) == len(refs):
                    continue
                obj.patch({"metadata": {"ownerReferences": kept or None, "resourceVersion": str(next(self._rv))}})
                await self._buses[resource].put({"type": "MODIFIED", "object": dict(obj.raw)})

    def _check_job_immutable(self, request: kmock.Request) -> None:
        """A Job's `spec.template` and `spec.selector` cannot change: the real server answers 422."""
        assert request.resource is not None and request.name is not None
        current = self._live(request.resource.plural, request.namespace or "", request.name)
        spec = request.data.get("spec")
        if current is None or not isinstance(spec, dict):
            return
        for field in ("template", "selector"):
            if field not in spec:
                continue
            before = (current.get("spec") or {}).get(field)
            after = merge_patch_dict(before or {}, spec[field]) if isinstance(spec[field], dict) else spec[field]
            if after != before:
                raise k8s.KubernetesError(
                    status=422,
                    reason="Invalid",
                    message=f'Job.batch "{request.name}" is invalid: spec.{field}: Invalid value: field is immutable',
                )

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

def _is_apply(request: kmock.Request) -> bool:
    return request.headers.get("Content-Type", "").startswith("application/apply-patch")


def _manager(request: kmock.Request) -> str:
    """The API server's default field manager: the client's user agent up to the first `/`."""
    agent = request.headers.get("User-Agent", "unknown")
    return request.params.get("fieldManager") or agent.split("/", 1)[0]


def _same_fields(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal managedFields apart from their timestamps: a no-op apply changes nothing."""

    def strip(obj: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k != "time"} for e in obj["metadata"].get("managedFields") or []]

    return strip(a) == strip(b)


def _propagation(request: kmock.Request) -> str:
    """propagationPolicy from the query or the DeleteOptions body; the default is Background, except for
    batch/v1 Jobs, whose API still defaults to orphaning (kubectl sends Background explicitly)."""
    body = request.data if isinstance(request.data, dict) else {}
    policy = request.params.get("propagationPolicy") or body.get("propagationPolicy")
    if policy is None and body.get("orphanDependents") is not None:
        policy = "Orphan" if body["orphanDependents"] else "Background"
    return str(policy or ("Orphan" if _is_job(request.resource) else "Background"))


def _default_job(job: dict[str, Any]) -> None:
    """The API server's defaulting of a new Job: a selector on its own uid and the labels that select the
    pods (both spellings), unless `manualSelector`; the counts' defaults."""
    meta, spec = job["metadata"], job.setdefault("spec", {})
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completions", 1)
    spec.setdefault("parallelism", 1)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    if spec.get("manualSelector"):
        return
    spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": meta["uid"]}}
    template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
    template_meta["labels"] = {
        **(template_meta.get("labels") or {}),
        "batch.kubernetes.io/controller-uid": meta["uid"],
        "batch.kubernetes.io/job-name": meta["name"],
        "controller-uid": meta["uid"],
        "job-name": meta["name"],
    }


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
