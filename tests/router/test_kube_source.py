"""Kubernetes discovery against the emulated API server: Ready pods the Service selects, swapped in one step
at a selector switch, and only once the new revision has a Ready pod (make before break)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import kmock
import pytest
from kubernetes import client
from kvpilot.router.backends import Backend
from kvpilot.router.kube_source import KubernetesSource, PodView, serving

from e2e.apiserver import ApiServer
from tests.router.conftest import eventually

NS = "default"
PODS = f"/api/v1/namespaces/{NS}/pods"
SERVICES = f"/api/v1/namespaces/{NS}/services"
MERGE = {"Content-Type": "application/merge-patch+json"}


def _pod(name: str, revision: str, ip: str, ready: bool) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": "demo", "kvpilot.dev/revision": revision}},
            "status": {"podIP": ip, "phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


@pytest.fixture()
async def api() -> AsyncIterator[tuple[httpx.AsyncClient, client.CoreV1Api]]:
    server = ApiServer()
    server.setup()
    async with server, kmock.Server(server) as running:
        url = str(running.url).rstrip("/")
        configuration = client.Configuration()
        configuration.host = url
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer t"}) as http:
            yield http, client.CoreV1Api(client.ApiClient(configuration))


async def test_follows_the_service_selector_and_switches_make_before_break(api) -> None:
    http, core = api
    for pod in (_pod("a1", "A", "10.0.0.1", True), _pod("a2", "A", "10.0.0.2", True),
                _pod("b1", "B", "10.0.0.3", False), _pod("x1", "A", "10.0.0.9", False)):
        assert (await http.post(PODS, json=pod)).status_code in (200, 201)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "demo-active"},
               "spec": {"selector": {"app": "demo", "kvpilot.dev/revision": "A"},
                        "ports": [{"port": 80, "targetPort": 8000}]}}
    assert (await http.post(SERVICES, json=service)).status_code in (200, 201)

    published: list[frozenset[Backend]] = []
    source = KubernetesSource(core, NS, "demo-active", pod_selector="app=demo")
    task = asyncio.create_task(source.run(published.append))
    try:
        rev_a = {Backend("a1", "http://10.0.0.1:8000"), Backend("a2", "http://10.0.0.2:8000")}
        await eventually(lambda: bool(published) and published[-1] == rev_a)

        await http.patch(f"{SERVICES}/demo-active", json={"spec": {"selector": {"kvpilot.dev/revision": "B"}}},
                         headers=MERGE)
        await asyncio.sleep(0.5)
        assert published[-1] == rev_a, "the new revision has no Ready pod yet: the old one keeps serving"

        switch_from = len(published)
        ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
        await http.patch(f"{PODS}/b1/status", json=ready, headers=MERGE)
        await eventually(lambda: published[-1] == {Backend("b1", "http://10.0.0.3:8000")})
        assert all(s in (rev_a, published[-1]) for s in published[switch_from - 1:]), "one swap, no mix, no gap"

        terminating = {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}
        await http.patch(f"{PODS}/b1", json=terminating, headers=MERGE)
        await eventually(lambda: published[-1] == frozenset())
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_serving_needs_ready_not_terminating_an_address_and_a_selector() -> None:
    pods = [PodView("ok", {"r": "1"}, "10.1.1.1", True, False),
            PodView("unready", {"r": "1"}, "10.1.1.2", False, False),
            PodView("leaving", {"r": "1"}, "10.1.1.3", True, True),
            PodView("no-ip", {"r": "1"}, None, True, False),
            PodView("other", {"r": "2"}, "10.1.1.4", True, False),
            PodView("v6", {"r": "1"}, "fd00::1", True, False)]
    assert serving({"r": "1"}, pods, 8000) == {Backend("ok", "http://10.1.1.1:8000"),
                                               Backend("v6", "http://[fd00::1]:8000")}
    assert serving({}, pods, 8000) == frozenset() and serving(None, pods, 8000) == frozenset()


def test_a_named_target_port_is_each_pods_container_port_of_that_name() -> None:
    """As Kubernetes resolves a Service's named targetPort into endpoints: per pod, and no port no endpoint."""
    pods = [PodView("a", {"r": "1"}, "10.1.1.1", True, False, {"http": 8000}),
            PodView("b", {"r": "1"}, "10.1.1.2", True, False, {"http": 9001, "metrics": 9090}),
            PodView("c", {"r": "1"}, "10.1.1.3", True, False, {"grpc": 50051})]
    assert serving({"r": "1"}, pods, "http") == {Backend("a", "http://10.1.1.1:8000"),
                                                 Backend("b", "http://10.1.1.2:9001")}
