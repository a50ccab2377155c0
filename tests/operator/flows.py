"""Steps the acceptance tests share: act as kubectl and as the Deployment controller against the emulator."""

from __future__ import annotations

from typing import Any

import httpx
from kvpilot.operator.router_resources import router_selector

from .conftest import ISVC_PATH, NAMESPACE
from .emulator import Emulator
from .harness import eventually

DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
MERGE = {"Content-Type": "application/merge-patch+json"}


def isvc_status(em: Emulator, name: str) -> dict[str, Any]:
    return (em.find("inferenceservices", NAMESPACE, name) or {}).get("status") or {}


def condition(em: Emulator, name: str, kind: str) -> dict[str, Any] | None:
    return next((c for c in isvc_status(em, name).get("conditions", []) if c["type"] == kind), None)


def deployment_names(em: Emulator) -> set[str]:
    return {d["metadata"]["name"] for d in em.all("deployments", NAMESPACE)}


def selector(em: Emulator, service: str) -> str | None:
    svc = em.find("services", NAMESPACE, service)
    return None if svc is None else svc["spec"]["selector"].get("kvpilot.dev/revision")


def serving(em: Emulator, name: str) -> str | None:
    """The revision the routers send traffic to: what the `<name>-engines` Service selects."""
    return selector(em, f"{name}-engines")


def stable_selects_routers(em: Emulator, name: str) -> bool:
    svc = em.find("services", NAMESPACE, name)
    return svc is not None and svc["spec"]["selector"] == router_selector(name)


async def create(api: httpx.AsyncClient, body: dict[str, Any]) -> None:
    response = await api.post(ISVC_PATH, json=body)
    assert response.status_code in (200, 201), response.text


async def patch_spec(api: httpx.AsyncClient, name: str, spec_patch: dict[str, Any]) -> None:
    response = await api.patch(f"{ISVC_PATH}/{name}", json={"spec": spec_patch}, headers=MERGE)
    assert response.status_code == 200, response.text


async def mark_ready(api: httpx.AsyncClient, em: Emulator, deployment: str) -> None:
    """What the Deployment controller would report once every replica passes its readiness probe."""
    obj = em.find("deployments", NAMESPACE, deployment)
    assert obj is not None, f"no Deployment {deployment}"
    replicas = obj["spec"]["replicas"]
    status = {
        "observedGeneration": obj["metadata"]["generation"],
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": replicas,
        "availableReplicas": replicas,
    }
    response = await api.patch(f"{DEPLOYMENTS}/{deployment}/status", json={"status": status}, headers=MERGE)
    assert response.status_code == 200, response.text


async def deploy_ready(api: httpx.AsyncClient, em: Emulator, name: str) -> str:
    """Wait for the first revision's Deployment and the routers', mark them ready, wait for phase Ready; returns
    the revision."""
    revision = await eventually(lambda: isvc_status(em, name).get("candidateRevision"), what="first revision")
    await eventually(lambda: {f"{name}-{revision}", f"{name}-router"} <= deployment_names(em), what="Deployments")
    await mark_ready(api, em, f"{name}-router")
    await mark_ready(api, em, f"{name}-{revision}")
    await eventually(lambda: isvc_status(em, name).get("phase") == "Ready", what="phase Ready")
    return revision


def event_reasons(em: Emulator, name: str) -> list[str]:
    return [
        e.get("reason", "") for e in em.all("events", NAMESPACE) if (e.get("involvedObject") or {}).get("name") == name
    ]
