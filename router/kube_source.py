"""Engines from Kubernetes: the Ready pods that the given Service's selector selects right now.

The Service's selector names the active revision (the operator switches it in one write at a blue-green
promotion), so following it makes the switch one swap of the pool. Make before break: after a switch the
router keeps the old revision's pods until it has seen a Ready pod of the new one (its two watches may
arrive in either order), so the pool is never empty in between and nothing waits or is refused.
Requests already on old pods finish there; the old pods drain on their own SIGTERM.

An engine's port is the Service's `targetPort`, as Kubernetes resolves it into endpoints: a number as it is, a
name as the pod's container port of that name (each pod its own), or `--k8s-port` over both.

It needs, in its namespace: pods `list` and `watch`; services `list` and `watch` (restrictable with
resourceNames to the one Service: the router lists and watches it by `metadata.name` field selector).
The `kubernetes` client is synchronous: each watch runs in a thread and hands events to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kvpilot.router.backends import Backend
from kvpilot.router.config import RouterConfig
from kvpilot.router.discovery import Publish

log = logging.getLogger(__name__)

_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_DEFAULT_ENGINE_PORT = 8000
USER_AGENT = "kvpilot-router"  # its API calls, told apart from the operator's (and counted apart in e2e)
_READ_TIMEOUT_S = 30  # a silent watch is re-opened this often, which is also when a stopped source notices
_BACKOFF_MAX_S = 10.0


@dataclass(frozen=True)
class PodView:
    name: str
    labels: dict[str, str]
    ip: str | None
    ready: bool
    terminating: bool
    ports: dict[str, int] = field(default_factory=dict)  # named container ports

    @classmethod
    def of(cls, pod: Any) -> PodView:
        status = pod.status
        conditions = (status.conditions if status else None) or []
        ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
        containers = (pod.spec.containers if pod.spec else None) or []
        ports = {p.name: p.container_port for c in containers for p in c.ports or [] if p.name}
        return cls(pod.metadata.name, dict(pod.metadata.labels or {}), status.pod_ip if status else None, ready,
                   pod.metadata.deletion_timestamp is not None, ports)

    def port(self, target: int | str) -> int | None:
        return target if isinstance(target, int) else self.ports.get(target)


def serving(selector: dict[str, str] | None, pods: Iterable[PodView], target: int | str) -> frozenset[Backend]:
    """The engines a selector gives: Ready, not terminating, with an address and the target port (a name: the
    pod's container port of that name; a pod without one is no endpoint). No selector selects nothing."""
    if not selector:
        return frozenset()
    return frozenset(
        Backend(p.name, f"http://[{p.ip}]:{port}" if ":" in p.ip else f"http://{p.ip}:{port}")
        for p in pods
        if p.ready and not p.terminating and p.ip and selector.items() <= p.labels.items()
        and (port := p.port(target)) is not None
    )


def _service_port(service: Any) -> int | str | None:
    ports = (service.spec.ports if service.spec else None) or []
    target = ports[0].target_port if ports else None
    return target if isinstance(target, int | str) else None


def default_namespace() -> str:
    if _SA_NAMESPACE.is_file():
        return _SA_NAMESPACE.read_text().strip()
    try:
        _, active = config.list_kube_config_contexts()
        return str(active["context"].get("namespace") or "default")
    except (config.ConfigException, OSError, KeyError, TypeError):
        return "default"


def api_client() -> client.ApiClient:
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:  # KUBECONFIG read now, not at import time as the kubernetes package's default does
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
        config.load_kube_config(config_file=path, client_configuration=configuration)
    api = client.ApiClient(configuration)
    api.user_agent = USER_AGENT
    return api


class KubernetesSource:
    def __init__(self, core: client.CoreV1Api, namespace: str, service: str, pod_selector: str | None = None,
                 port: int | None = None) -> None:
        self._core = core
        self.namespace = namespace
        self.service = service
        self._pod_selector = pod_selector
        self._port = port
        self._selector: dict[str, str] | None = None
        self._previous: dict[str, str] | None = None  # the selector before a switch, until the new one serves
        self._service_port: int | str | None = None
        self._pods: dict[str, PodView] = {}
        self._published: frozenset[Backend] | None = None
        self._stopped = threading.Event()
        self._watches: list[watch.Watch] = []  # open ones, so that stopping closes their connections at once

    @classmethod
    def from_config(cls, cfg: RouterConfig) -> KubernetesSource:
        assert cfg.k8s_service is not None
        return cls(client.CoreV1Api(api_client()), cfg.k8s_namespace or default_namespace(), cfg.k8s_service,
                   cfg.k8s_pod_selector, cfg.k8s_port)

    @property
    def port(self) -> int | str:
        """The target port: --k8s-port, else the Service's targetPort (a number or a container port's name)."""
        return self._port or self._service_port or _DEFAULT_ENGINE_PORT

    async def run(self, publish: Publish) -> None:
        loop = asyncio.get_running_loop()

        def post(apply: Callable[[], None]) -> None:
            def step() -> None:
                apply()
                self._publish(publish)

            loop.call_soon_threadsafe(step)

        field = f"metadata.name={self.service}"
        threads = [
            threading.Thread(target=self._watch, daemon=True, name="watch-service",
                             args=(self._core.list_namespaced_service, {"field_selector": field}, self._services,
                                   self._on_service, post)),
            threading.Thread(target=self._watch, daemon=True, name="watch-pods",
                             args=(self._core.list_namespaced_pod, {"label_selector": self._pod_selector},
                                   self._all_pods, self._on_pod, post)),
        ]
        for t in threads:
            t.start()
        try:
            await asyncio.Event().wait()
        finally:
            self._stopped.set()
            for w in list(self._watches):
                w.stop()

    # ---- state, on the event loop ------------------------------------------------------------
    def _on_service(self, kind: str, service: Any) -> None:
        if service is not None and service.metadata.name != self.service:  # a server that ignores field selectors
            return
        selector = None if kind == "DELETED" else dict((service.spec.selector if service.spec else None) or {})
        if selector != self._selector:
            log.info("service %s selects %s", self.service, selector)
            if self._selector and serving(self._selector, self._pods.values(), self.port):
                self._previous = self._selector
            self._selector = selector
        self._service_port = None if kind == "DELETED" else _service_port(service)

    def _services(self, items: list[Any]) -> None:
        """A fresh list of the Service (at most one)."""
        mine = [i for i in items if i.metadata.name == self.service]
        if mine:
            self._on_service("ADDED", mine[0])
        else:
            self._on_service("DELETED", None)

    def _all_pods(self, items: list[Any]) -> None:
        """A fresh list of the pods: replaces what the watch had built (in one step of the loop)."""
        self._pods = {}
        for item in items:
            self._on_pod("ADDED", item)

    def _on_pod(self, kind: str, pod: Any) -> None:
        if kind == "DELETED":
            self._pods.pop(pod.metadata.name, None)
        else:
            self._pods[pod.metadata.name] = PodView.of(pod)

    def _current(self) -> frozenset[Backend]:
        now = serving(self._selector, self._pods.values(), self.port)
        if now or self._previous is None:
            self._previous = None
            return now
        return serving(self._previous, self._pods.values(), self.port)

    def _publish(self, publish: Publish) -> None:
        backends = self._current()
        if backends != self._published:
            self._published = backends
            publish(backends)

    # ---- watches, each on its own thread -----------------------------------------------------
    def _watch(self, list_fn: Callable[..., Any], kwargs: dict[str, Any], on_list: Callable[[list[Any]], None],
               on_event: Callable[[str, Any], None], post: Callable[[Callable[[], None]], None]) -> None:
        """List, then watch from the list's version; re-list when the server says that version is gone."""
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        version: str | None = None
        backoff = 0.5
        while not self._stopped.is_set():
            try:
                if version is None:
                    listed = list_fn(self.namespace, **kwargs)
                    items, version = listed.items, listed.metadata.resource_version
                    post(lambda items=items: on_list(items))
                w = watch.Watch()
                self._watches.append(w)
                try:
                    for event in w.stream(list_fn, self.namespace, resource_version=version,
                                          _request_timeout=(5, _READ_TIMEOUT_S), **kwargs):
                        obj = event["object"]
                        version = obj.metadata.resource_version or version
                        post(lambda kind=event["type"], obj=obj: on_event(kind, obj))
                finally:
                    self._watches.remove(w)
                backoff = 0.5
            except ApiException as exc:
                if exc.status == 410:
                    version = None
                    continue
                log.warning("watching %s: %s", list_fn.__name__, exc)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
            except Exception as exc:  # a read timeout, a dropped connection: watch again from where it was
                if self._stopped.is_set():
                    return
                # An object the client cannot read (ValueError) is no routine interruption: say so.
                log.log(logging.WARNING if isinstance(exc, ValueError) else logging.DEBUG, "watch %s interrupted: %s",
                        list_fn.__name__, exc)
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
