"""Bring children to their desired state: create what is missing, patch what drifted, delete what is stale.

Every write is idempotent, so a pass can be repeated (after a crash, a conflict, a restart) safely.
A second pass over an unchanged cluster makes no write at all: patches are sent only on real drift.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kvpilot.operator.kube import KINDS, ApiError, KubeClient

log = logging.getLogger(__name__)
T = TypeVar("T")
CONFLICT_RETRIES = 5


def with_conflict_retries(action: Callable[[], T], what: str, backoff: float = 0.1) -> T:
    """409 means someone wrote in between (or a create raced): repeat the idempotent action."""
    for attempt in range(CONFLICT_RETRIES):
        try:
            return action()
        except ApiError as exc:
            if exc.status != 409 or attempt == CONFLICT_RETRIES - 1:
                raise
            log.info("conflict on %s, retrying (%d)", what, attempt + 1)
            time.sleep(backoff * (2**attempt))
    raise AssertionError("unreachable")


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    meta = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_subset(desired: Any, actual: Any) -> bool:
    """Does `actual` already hold `desired`? Extra keys in `actual` (server defaults) are fine, and an
    empty list or map we send counts as present when the server omits it (it drops empty fields)."""
    if desired in ({}, []) and actual is None:
        return True
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(is_subset(v, actual.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(desired) == len(actual)
            and all(is_subset(d, a) for d, a in zip(desired, actual, strict=True))
        )
    if desired is None:
        return actual is None or actual == {} or actual == []
    return bool(desired == actual or str(desired) == str(actual))


class Applier:
    def __init__(self, client: KubeClient, owner: dict[str, Any]) -> None:
        self.client = client
        self.owner = owner
        self.namespace = owner["metadata"]["namespace"]

    def ensure(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create or patch one child, owned by the InferenceService (so deleting it removes the child)."""
        kind = KINDS[manifest["kind"]]
        name = manifest["metadata"]["name"]
        desired = {**manifest, "metadata": {**manifest["metadata"], "ownerReferences": [owner_reference(self.owner)]}}
        body = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}

        def attempt() -> dict[str, Any]:
            current = self.client.get(kind, self.namespace, name)
            if current is None:
                log.info("creating %s/%s", kind.kind, name)
                # A 409 here means it was created meanwhile: the retry finds it and patches instead.
                return self.client.create(kind, self.namespace, desired)
            if is_subset(body, current):
                return current
            log.info("patching %s/%s (drift)", kind.kind, name)
            return self.client.patch(kind, self.namespace, name, body)

        return with_conflict_retries(attempt, f"{kind.kind}/{name}")

    def delete(self, kind_name: str, name: str) -> bool:
        kind = KINDS[kind_name]
        deleted = with_conflict_retries(lambda: self.client.delete(kind, self.namespace, name), f"{kind_name}/{name}")
        if deleted:
            log.info("deleted %s/%s", kind_name, name)
        return deleted

    def get(self, kind_name: str, name: str) -> dict[str, Any] | None:
        return self.client.get(KINDS[kind_name], self.namespace, name)

    def list(self, kind_name: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        return self.client.list(KINDS[kind_name], self.namespace, labels)
