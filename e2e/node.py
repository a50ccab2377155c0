"""The local node: the Deployment controller and the kubelet in one loop, talking only through the API.

Each pass lists Deployments and Pods, creates Pod objects (owned by their Deployment, their container port the
loopback port the process got) and starts a `PodRunner` for each (one that mounts its ServiceAccount token
gets the harness's kubeconfig, standing in for it), terminates the runners whose Pod object is gone (deleted,
or garbage-collected with its Deployment), and writes Pod and Deployment status back. Template changes roll
with maxSurge 1 / maxUnavailable 0, as the operator's Deployments ask. It acts only on the Pods it created:
a Job's pods are `JobController`'s (e2e/jobs.py), and only this node's serving pods go to Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e2e.crdapi import selector_matches
from e2e.kube import ApiError, Kube
from e2e.loop import ControllerLoop
from e2e.pod import PodRunner

log = logging.getLogger(__name__)
HASH_LABEL = "pod-template-hash"
PORT_ANNOTATION = "e2e.kvpilot.dev/port"


def _on_port(pod_spec: dict[str, Any], port: int) -> dict[str, Any]:
    """The pod's spec with its first container's ports on the loopback port its process got: a named targetPort
    then resolves to it, as it would to the containerPort in a cluster (each pod has an address of its own)."""
    spec = copy.deepcopy(pod_spec)
    for item in spec["containers"][0].get("ports") or []:
        item["containerPort"] = port
    return spec


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:8]


class Node(ControllerLoop):
    name = "node"

    def __init__(
        self, kube: Kube, log_dir: Path, time_scale: float, on_pods: Callable[[list[PodRunner]], None],
        kubeconfig: Path | None = None,
    ) -> None:
        super().__init__()
        self.kube, self.log_dir, self.time_scale, self.on_pods = kube, log_dir, time_scale, on_pods
        self.kubeconfig = kubeconfig
        self.runners: dict[str, PodRunner] = {}
        self.owner: dict[str, str] = {}  # pod -> deployment
        self.revision: dict[str, str] = {}  # pod -> kvpilot.dev/revision label
        self.labels: dict[str, dict[str, str]] = {}  # pod -> its labels (the scrape configuration reads them)
        self.hashes: dict[str, str] = {}  # pod -> template hash
        self._published: dict[str, Any] = {}
        self.terminating: list[PodRunner] = []  # deleted, still draining: Prometheus keeps scraping them

    def pods_of(self, revision: str) -> list[PodRunner]:
        return [r for name, r in self.runners.items() if self.revision.get(name) == revision]

    async def _loop(self) -> None:
        while True:
            try:
                await self._pass()
            except (ApiError, OSError, ValueError) as exc:
                log.error("node pass failed: %r", exc)
            await asyncio.sleep(0.25)

    async def _pass(self) -> None:
        deployments = {d["metadata"]["name"]: d for d in await self.kube.list("Deployment")}
        pods = {p["metadata"]["name"]: p for p in await self.kube.list("Pod")}
        for name in [n for n in self.runners if n not in pods or self.owner[n] not in deployments]:
            self._begin_termination(name)
        for deployment in deployments.values():
            await self._sync_deployment(deployment)
        for name, runner in self.runners.items():
            if name in pods:
                await self._publish_pod(name, runner)
        for deployment in deployments.values():
            await self._publish_deployment(deployment)
        self.terminating = [r for r in self.terminating if not r.finished]
        self.on_pods([*self.runners.values(), *self.terminating])

    def _begin_termination(self, name: str) -> None:
        runner = self.runners.pop(name)
        task = asyncio.get_running_loop().create_task(runner.terminate(), name=f"terminate {name}")
        self._terminations.add(task)
        task.add_done_callback(self._terminations.discard)
        self.terminating.append(runner)

    def _mine(self, deployment: str) -> list[str]:
        return [n for n, owner in self.owner.items() if owner == deployment and n in self.runners]

    async def _sync_deployment(self, deployment: dict[str, Any]) -> None:
        meta, spec = deployment["metadata"], deployment["spec"]
        current = template_hash(spec["template"])
        want = int(spec.get("replicas", 1))
        mine = self._mine(meta["name"])
        new = [n for n in mine if self.hashes[n] == current]
        old = [n for n in mine if self.hashes[n] != current]
        if len(new) < want and len(new) + len(old) < want + 1:
            await self._create_pod(deployment, current)
        ready_new = sum(self.runners[n].ready for n in new)
        if old and ready_new >= want:
            await self.kube.delete("Pod", old[0])
        elif len(new) > want:
            surplus = sorted(new, key=lambda n: self.runners[n].ready)[0]
            await self.kube.delete("Pod", surplus)

    async def _create_pod(self, deployment: dict[str, Any], current: str) -> None:
        meta, template = deployment["metadata"], deployment["spec"]["template"]
        name = f"{meta['name']}-{current[:5]}-{uuid.uuid4().hex[:5]}"
        runner = PodRunner(name, template["spec"], self.log_dir, self.time_scale, self._credentials(template["spec"]))
        labels = {**(template.get("metadata") or {}).get("labels", {}), HASH_LABEL: current}
        if not selector_matches(deployment["spec"]["selector"]["matchLabels"], labels):
            raise ValueError(f"Deployment {meta['name']}: selector does not match its template's labels")
        owner = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": {PORT_ANNOTATION: str(runner.port)},
                "ownerReferences": [owner],
            },
            "spec": _on_port(template["spec"], runner.port),
        }
        await self.kube.create("Pod", pod)
        self.runners[name], self.owner[name], self.hashes[name] = runner, meta["name"], current
        self.revision[name] = labels.get("kvpilot.dev/revision", "")
        self.labels[name] = labels
        runner.start()
        log.info("pod %s: started on port %d", name, runner.port)

    def _credentials(self, pod_spec: dict[str, Any]) -> dict[str, str]:
        """A pod that mounts its ServiceAccount token reaches the API server: here through the kubeconfig, which
        stands in for the token and the in-cluster address. One that does not mount it gets no way in."""
        if self.kubeconfig is None or pod_spec.get("automountServiceAccountToken") is False:
            return {}
        return {"KUBECONFIG": str(self.kubeconfig)}

    async def _publish_pod(self, name: str, runner: PodRunner) -> None:
        ready = "True" if runner.ready else "False"
        status = {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": ready}, {"type": "ContainersReady", "status": ready}],
            "containerStatuses": [  # image and imageID: a kubelet always reports them (the client requires them)
                {"name": runner.container["name"], "ready": runner.ready, "restartCount": runner.restarts,
                 "started": True, "image": runner.container.get("image", ""), "imageID": ""}
            ],
        }
        if self._published.get(name) != status:
            with contextlib.suppress(ApiError):  # it may have been deleted since the listing
                await self.kube.patch("Pod", name, {"status": status}, sub="status")
                self._published[name] = status

    async def _publish_deployment(self, deployment: dict[str, Any]) -> None:
        meta, spec = deployment["metadata"], deployment["spec"]
        current = template_hash(spec["template"])
        mine = [self.runners[n] for n in self._mine(meta["name"])]
        updated = [r for r, n in zip(mine, self._mine(meta["name"]), strict=True) if self.hashes[n] == current]
        ready = sum(r.ready for r in mine)
        want = int(spec.get("replicas", 1))
        available = "True" if ready >= want else "False"
        status = {
            "observedGeneration": meta.get("generation", 1),
            "replicas": len(mine),
            "updatedReplicas": len(updated),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(want - ready, 0),
            "conditions": [
                {"type": "Available", "status": available, "reason": "MinimumReplicasAvailable"},
                {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"},
            ],
        }
        key = f"deployment/{meta['name']}"
        if self._published.get(key) != status or (deployment.get("status") or {}) != status:
            with contextlib.suppress(ApiError):  # it may have been deleted since the listing
                await self.kube.patch("Deployment", meta["name"], {"status": status}, sub="status")
                self._published[key] = status
