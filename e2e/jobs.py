"""The Job controller of the local node (batch/v1), with the kubelet's part for Job pods in `JobPodRunner`.

Each pass lists Jobs and Pods and, for each Job, does what the real controller does for a non-indexed Job
with `restartPolicy: Never`, one pod at a time:
- no pod running, not finished: create a Pod owned by the Job (controller ownerReference), named
  `<job>-<5 letters>`, labelled `job-name`/`controller-uid` (both spellings), and run its container;
- the pod's container exits: the Pod's status gets phase Succeeded or Failed and its
  `containerStatuses[0].state.terminated` (exitCode, reason, message, startedAt, finishedAt); only then does
  the Job count it, so a Job that reads Complete or Failed always has a pod whose status tells why;
- `succeeded` reaches `completions` (default 1): condition Complete and `completionTime`;
  `failed` exceeds `backoffLimit` (default 6; 0 means one attempt): condition Failed, BackoffLimitExceeded;
  `activeDeadlineSeconds` since `startTime` passed: the running pod is deleted (its process gets SIGTERM,
  then SIGKILL after the pod's grace) and counted failed, condition Failed, DeadlineExceeded;
- a pod deleted while it runs (by anyone, or with its Job by garbage collection): the process is stopped
  and, if its Job is still there, the attempt counts as failed;
- `ttlSecondsAfterFinished`: the finished Job is deleted (Background), taking its pods with it.
Not emulated: parallelism above 1, Indexed completion, pod failure policies, suspend after start, and
the real back-off between attempts (10 s doubling), so a retry starts at once.

Job pods are this module's alone: `Node` manages only Pods owned by Deployments, and Prometheus scrapes
only the Node's serving pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import string
import time
from pathlib import Path
from typing import Any

from e2e.jobpod import JobPodRunner, rfc3339
from e2e.kube import ApiError, Kube
from e2e.loop import ControllerLoop

log = logging.getLogger(__name__)
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
CONTROLLER_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")
DEFAULT_BACKOFF_LIMIT = 6


@dataclasses.dataclass
class JobState:
    """What the controller has counted for one Job (by uid); the Job's status is written from it."""

    start_time: str
    started: float  # monotonic: activeDeadlineSeconds counts from here
    active: str | None = None  # the pod running now
    succeeded: int = 0
    failed: int = 0
    completion_time: str | None = None
    condition: dict[str, Any] | None = None  # Complete or Failed, once finished
    finished: float | None = None  # monotonic: ttlSecondsAfterFinished counts from here

    def finish(self, kind: str, reason: str, message: str) -> None:
        now = rfc3339()
        self.condition = {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastProbeTime": now,
            "lastTransitionTime": now,
        }
        self.finished = time.monotonic()
        if kind == "Complete":
            self.completion_time = now


def pod_name(job: str) -> str:
    return f"{job}-{''.join(random.choices(string.ascii_lowercase, k=5))}"


def pod_status(runner: JobPodRunner) -> dict[str, Any]:
    """The Pod's status as the kubelet reports it: Pending, Running (Ready: no probes), Succeeded or Failed."""
    base = {"podIP": "127.0.0.1", "hostIP": "127.0.0.1", "startTime": runner.created_at}
    container = {
        "name": runner.container.get("name", ""),
        "image": runner.container.get("image", ""),
        "imageID": "",  # a kubelet reports it; the kubernetes client requires it
        "restartCount": 0,
    }
    done = runner.terminated
    if runner.started_at is None:
        state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        phase, ready, ready_reason = "Pending", False, "ContainersNotReady"
    elif done is None:
        state = {"running": {"startedAt": runner.started_at}}
        phase, ready, ready_reason = "Running", True, None
    else:
        state = {"terminated": done.state()}
        phase = "Succeeded" if done.exit_code == 0 else "Failed"
        ready, ready_reason = False, "PodCompleted" if done.exit_code == 0 else "PodFailed"

    def cond(kind: str, value: bool, reason: str | None = None) -> dict[str, Any]:
        return {"type": kind, "status": str(value), **({"reason": reason} if reason else {})}

    return {
        **base,
        "phase": phase,
        "conditions": [
            cond("PodScheduled", True),
            cond("Initialized", True),
            cond("ContainersReady", ready, ready_reason),
            cond("Ready", ready, ready_reason),
        ],
        "containerStatuses": [{**container, "ready": ready, "started": done is None and ready, "state": state}],
    }


class JobController(ControllerLoop):
    name = "jobs"

    def __init__(self, kube: Kube, log_dir: Path, period_s: float = 0.25) -> None:
        super().__init__()
        self.kube, self.log_dir, self.period_s = kube, log_dir, period_s
        self.runners: dict[str, JobPodRunner] = {}  # pod -> its container
        self.owner: dict[str, str] = {}  # pod -> Job uid
        self.jobs: dict[str, JobState] = {}  # Job uid -> what was counted
        self._published: dict[str, dict[str, Any]] = {}  # pod -> last status written

    async def _loop(self) -> None:
        while True:
            try:
                await self._pass()
            except (ApiError, OSError, ValueError) as exc:
                log.error("job controller pass failed: %r", exc)
            await asyncio.sleep(self.period_s)

    async def _pass(self) -> None:
        jobs = {j["metadata"]["uid"]: j for j in await self.kube.list("Job")}
        pods = {p["metadata"]["name"] for p in await self.kube.list("Pod")}
        for name in [n for n in self.runners if n not in pods]:
            self._pod_gone(name)
        for name, runner in list(self.runners.items()):
            await self._publish_pod(name, runner)  # before the Job counts it: its status must be there first
            state = self.jobs.get(self.owner[name])
            if runner.terminated is not None and state is not None and state.active == name:
                self._count(state, runner)
        for job in jobs.values():
            await self._sync_job(job)
            await self._publish_job(job)
        for uid in [u for u in self.jobs if u not in jobs]:
            del self.jobs[uid]

    def _count(self, state: JobState, runner: JobPodRunner) -> None:
        state.active = None
        if runner.terminated is not None and runner.terminated.exit_code == 0:
            state.succeeded += 1
        else:
            state.failed += 1

    def _pod_gone(self, name: str) -> None:
        """Deleted or garbage-collected: stop the container; a Job still waiting on it counts the attempt."""
        runner = self.runners.pop(name)
        self._published.pop(name, None)
        state = self.jobs.get(self.owner.pop(name))
        if state is not None and state.active == name:
            self._count(state, runner)
        task = asyncio.get_running_loop().create_task(runner.terminate(), name=f"terminate {name}")
        self._terminations.add(task)
        task.add_done_callback(self._terminations.discard)

    async def _sync_job(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        if meta["uid"] not in self.jobs:
            if spec.get("suspend"):
                return
            self.jobs[meta["uid"]] = JobState(start_time=rfc3339(), started=time.monotonic())
        state = self.jobs[meta["uid"]]
        if state.condition is None:
            deadline = spec.get("activeDeadlineSeconds")
            if deadline is not None and time.monotonic() - state.started >= float(deadline):
                if state.active is not None:
                    victim, state.active, state.failed = state.active, None, state.failed + 1
                    with contextlib.suppress(ApiError):
                        await self.kube.delete("Pod", victim)
                    self._pod_gone(victim)
                state.finish("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
            elif state.succeeded >= int(spec.get("completions", 1)):
                state.finish("Complete", "CompletionsReached", "Reached expected number of succeeded pods")
            elif state.failed > int(spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)):
                state.finish("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            elif state.active is None:
                await self._create_pod(job, state)
        ttl = spec.get("ttlSecondsAfterFinished")
        if state.finished is not None and ttl is not None and time.monotonic() - state.finished >= float(ttl):
            log.info("job %s: ttlSecondsAfterFinished passed, deleting it", meta["name"])
            await self.kube.delete("Job", meta["name"])

    async def _create_pod(self, job: dict[str, Any], state: JobState) -> None:
        meta, template = job["metadata"], job["spec"]["template"]
        template_meta = template.get("metadata") or {}
        name = pod_name(meta["name"])
        labels = {
            **(template_meta.get("labels") or {}),
            **dict.fromkeys(JOB_NAME_LABELS, meta["name"]),
            **dict.fromkeys(CONTROLLER_UID_LABELS, meta["uid"]),
        }
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        pod_meta: dict[str, Any] = {"name": name, "labels": labels, "ownerReferences": [owner]}
        if template_meta.get("annotations"):
            pod_meta["annotations"] = dict(template_meta["annotations"])
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": template["spec"]}
        await self.kube.create("Pod", pod)
        runner = JobPodRunner(name, template["spec"], self.log_dir)
        self.runners[name], self.owner[name], state.active = runner, meta["uid"], name
        runner.start()
        log.info("job %s: pod %s started", meta["name"], name)

    async def _publish_pod(self, name: str, runner: JobPodRunner) -> None:
        status = pod_status(runner)
        if self._published.get(name) != status:
            with contextlib.suppress(ApiError):  # it may have been deleted since the listing
                await self.kube.patch("Pod", name, {"status": status}, sub="status")
                self._published[name] = status

    async def _publish_job(self, job: dict[str, Any]) -> None:
        """Zero counts and unset times are omitted, as the real controller writes them; `ready` is not."""
        state = self.jobs.get(job["metadata"]["uid"])
        if state is None:
            return
        runner = self.runners.get(state.active or "")
        status: dict[str, Any] = {
            "startTime": state.start_time,
            "active": 1 if state.active else None,
            "ready": int(runner is not None and runner.running),
            "succeeded": state.succeeded or None,
            "failed": state.failed or None,
            "completionTime": state.completion_time,
            "conditions": [state.condition] if state.condition else None,
        }
        if {k: v for k, v in status.items() if v is not None} != (job.get("status") or {}):
            with contextlib.suppress(ApiError):  # it may have been deleted since the listing
                await self.kube.patch("Job", job["metadata"]["name"], {"status": status}, sub="status")
