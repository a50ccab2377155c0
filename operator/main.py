"""kopf handler registration only: every handler runs one reconciliation pass under a per-object lock.

Creation, spec changes and operator start-up react at once, and so does any change to an owned Deployment,
Job or Pod (a candidate becoming ready, a load step finishing, a trial crash-looping); a timer re-runs the
pass every `resync_seconds` to advance what only time moves (timeouts, verification windows, scale-down
delays). The children are read from kopf's indexes (children.py), fed by watches. Handlers are sync: kopf
runs them in its thread pool, and the Kubernetes client here is sync.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import kopf
from kvpilot.operator.children import INDEXED, MANAGED_BY, index_entry, owner_of
from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.kube import KubeClient
from kvpilot.operator.reconcile import reconcile
from kvpilot.operator.reducer import Event
from kvpilot.operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)
WATCHED_FOR_CHANGES = ("Deployment", "Job", "Pod")


def build_registry(config: OperatorConfig, client: KubeClient | None = None) -> kopf.OperatorRegistry:
    """A registry with our handlers; a function (not import-time decorators) so tests run many operators."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)
    shared: dict[str, KubeClient] = {}
    locks: dict[tuple[str, str], threading.Lock] = {}
    guard = threading.Lock()

    def kube() -> KubeClient:
        return shared["client"]

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        shared["client"] = client or KubeClient()  # startup runs before login and every handler
        # Our own state lives in status; kopf's bookkeeping goes to annotations, outside the schema.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 300
        # A deletion waits for the running pass of the resync timer; re-check often, not kopf's 60 s.
        settings.background.cancellation_polling = min(2.0, config.resync_seconds)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(**kube().connection_info())

    def run_pass(namespace: str, name: str, kwargs: Mapping[str, Any]) -> None:
        with guard:
            lock = locks.setdefault((namespace, name), threading.Lock())

        def emit(event: Event) -> None:
            involved = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
                        "metadata": {"name": name, "namespace": namespace, "uid": uids.get((namespace, name))}}
            kopf.event(involved, type=event.type, reason=event.reason, message=event.message)

        indexes = {index: kwargs[index] for _, index in INDEXED.values()}
        with lock:
            reconcile(kube(), namespace, name, config, emit, indexes)

    uids: dict[tuple[str, str], str | None] = {}  # for Events' involvedObject; refreshed by every handler

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, field="spec", registry=registry)
    def on_change(body: kopf.Body, **kwargs: Any) -> None:
        uids[(body.metadata.namespace, body.metadata.name)] = body.metadata.uid
        run_pass(body.metadata.namespace, body.metadata.name, kwargs)

    @kopf.timer(*resource, interval=config.resync_seconds, registry=registry)
    def resync(body: kopf.Body, **kwargs: Any) -> None:
        uids[(body.metadata.namespace, body.metadata.name)] = body.metadata.uid
        run_pass(body.metadata.namespace, body.metadata.name, kwargs)

    for kind, (selector, index) in INDEXED.items():
        kopf.index(selector, id=index, labels=MANAGED_BY, registry=registry)(_indexer)
        if kind in WATCHED_FOR_CHANGES:

            @kopf.on.event(selector, id=f"{index}-changed", labels=MANAGED_BY, registry=registry)
            def child_changed(body: kopf.Body, namespace: str | None, **kwargs: Any) -> None:
                owner = owner_of(body.metadata.labels)
                if owner is not None and namespace is not None and (namespace, owner) in uids:
                    run_pass(namespace, owner, kwargs)

    return registry


def _indexer(namespace: str | None, body: kopf.Body, **_: Any) -> dict[tuple[str | None, str], dict[str, Any]]:
    return index_entry(namespace, body)
