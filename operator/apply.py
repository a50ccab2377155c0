"""Bring children to their desired state with server-side apply; read them from the watch-fed indexes.

Drift needs no comparison of values here. Each applied manifest carries a hash of itself; a child whose
hash matches, and none of whose fields that we set is owned by another field manager (the API server
moves a field to whoever last changed it), is as we left it and is not written. Anything else is applied
as `kvpilot`: created, brought back, or trimmed of fields we no longer set. When another manager has
taken one of our fields the API server answers 409 naming it; that is posted as a Warning Event and the
apply is repeated with `force`, since the operator owns its children.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import kopf
from kvpilot.operator.children import Children
from kvpilot.operator.kube import FIELD_MANAGER, KINDS, ApiError, KubeClient
from kvpilot.operator.reducer import Event

log = logging.getLogger(__name__)
APPLIED = "kvpilot.dev/applied"  # annotation: hash of the manifest last applied
CONFLICT_DELAY_S = 1.0


def applied_hash(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _touches(fields: dict[str, Any], desired: Any) -> bool:
    """Does a managedFields fieldsV1 tree name any field that `desired` sets?"""
    for key, sub in fields.items():
        kind, _, name = key.partition(":")
        if kind == "f" and isinstance(desired, dict) and name in desired:
            if not sub or _touches(sub, desired[name]):
                return True
        elif kind == "k" and isinstance(desired, list):
            item_key = json.loads(name)
            for item in desired:
                if isinstance(item, dict) and item_key.items() <= item.items() and (not sub or _touches(sub, item)):
                    return True
        elif kind == "v" and isinstance(desired, list) and json.loads(name) in desired:
            return True
    return False


def taken_over(live: dict[str, Any], desired: dict[str, Any]) -> list[str]:
    """Managers other than ours that own a field of `desired` (the object, not its status)."""
    return [e.get("manager", "?") for e in (live.get("metadata") or {}).get("managedFields") or []
            if e.get("manager") != FIELD_MANAGER and e.get("subresource") != "status"
            and _touches(e.get("fieldsV1") or {}, desired)]


def conflict_error(what: str, exc: ApiError) -> kopf.TemporaryError:
    return kopf.TemporaryError(f"{what}: {exc}", delay=CONFLICT_DELAY_S)


class Applier:
    def __init__(self, client: KubeClient, owner: dict[str, Any], children: Children,
                 emit: Callable[[Event], None]) -> None:
        self.client, self.owner, self.children, self.emit = client, owner, children, emit
        self.namespace = owner["metadata"]["namespace"]
        self._written: dict[tuple[str, str], dict[str, Any] | None] = {}  # this pass's own writes, newest

    def ensure(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Apply one child, owned by the InferenceService (deleting it removes the child), unless it is as we
        left it."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        desired = json.loads(json.dumps(manifest))
        kopf.append_owner_reference(desired, owner=self.owner)
        annotations = desired["metadata"].setdefault("annotations", {})
        annotations[APPLIED] = applied_hash(desired)
        live = self.get(kind, name)
        others = taken_over(live, desired) if live is not None else []
        if live is not None and (live["metadata"].get("annotations") or {}).get(APPLIED) == annotations[APPLIED] \
                and not others:
            return live
        log.info("applying %s/%s%s", kind, name, f" (fields taken by {others})" if others else "")
        try:
            result = self.client.apply(desired)
        except ApiError as exc:
            if exc.status != 409:
                raise
            fields = ", ".join(f"{c.get('field')} ({c.get('message')})" for c in exc.causes) or exc.message
            self.emit(Event("Warning", "FieldConflict", f"{kind} {name}: taking back {fields}"))
            try:
                result = self.client.apply(desired, force=True)
            except ApiError as again:
                if again.status == 409:
                    raise conflict_error(f"applying {kind}/{name}", again) from again
                raise
        self._written[(kind, name)] = result
        return result

    def delete(self, kind_name: str, name: str) -> bool:
        try:
            deleted = self.client.delete(KINDS[kind_name], self.namespace, name)
        except ApiError as exc:
            if exc.status == 409:
                raise conflict_error(f"deleting {kind_name}/{name}", exc) from exc
            raise
        self._written[(kind_name, name)] = None
        if deleted:
            log.info("deleted %s/%s", kind_name, name)
        return deleted

    def get(self, kind_name: str, name: str) -> dict[str, Any] | None:
        if (kind_name, name) in self._written:
            return self._written[(kind_name, name)]
        return self.children.get(kind_name, name)

    def list(self, kind_name: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        seen = {o["metadata"]["name"]: o for o in self.children.list(kind_name, labels)}
        for (kind, name), obj in self._written.items():
            if kind != kind_name:
                continue
            if obj is None:
                seen.pop(name, None)
            elif labels.items() <= (obj["metadata"].get("labels") or {}).items():
                seen[name] = obj
        return list(seen.values())
