"""kopf handler registration only: every handler runs one reconciliation pass under a per-object lock.

Creation, spec changes and operator start-up react at once; a timer re-runs the pass every
`resync_seconds` to advance rollouts (readiness, verification, scale-down delays) and repair drift.
Handlers are sync: kopf runs them in its thread pool, and the Kubernetes client here is sync.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import kopf
from kvpilot.operator.config import OperatorConfig
from kvpilot.operator.kube import KubeClient
from kvpilot.operator.reconcile import reconcile
from kvpilot.operator.reducer import Event
from kvpilot.operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)


def build_registry(config: OperatorConfig, client: KubeClient | None = None) -> kopf.OperatorRegistry:
    """A registry with our handlers; a function (not import-time decorators) so tests run many operators."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)
    shared: dict[str, KubeClient] = {}

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

    def run_pass(body: kopf.Body, memo: kopf.Memo) -> None:
        lock: threading.Lock = memo.setdefault("lock", threading.Lock())

        def emit(event: Event) -> None:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)

        with lock:
            reconcile(kube(), body.metadata.namespace, body.metadata.name, config, emit)

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    @kopf.on.update(*resource, field="spec", registry=registry)
    def on_change(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        run_pass(body, memo)

    @kopf.timer(*resource, interval=config.resync_seconds, registry=registry)
    def resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        run_pass(body, memo)

    return registry
