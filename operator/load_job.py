"""A tuning load step as a Kubernetes Job: `kvpilot bench serve` against the trial's own Service.

The Job's container writes a short summary to /dev/termination-log, which the kubelet copies into the
pod's status (`state.terminated.message`), so the operator reads the client's own count of completed and
failed requests without access to logs. Latency and throughput come from Prometheus, over the trial
revision's series; the summary's start time bounds that window.

The load generator draws lengths uniformly and arrivals as a Poisson process: a `normal` length
distribution runs as the uniform one with the same mean and variance, and `constant` / `ramp` arrival
patterns run as Poisson arrivals at each step's rate.
"""

from __future__ import annotations

import json
import math
from typing import Any

from kvpilot.operator.resources import restricted_pod
from kvpilot.operator.spec import InferenceServiceSpec, LengthDistribution, WorkloadSpec
from pydantic import BaseModel, Field

SUMMARY_PATH = "/dev/termination-log"
LABEL_TRIAL = "kvpilot.dev/trial"
LABEL_TUNING_OF = "kvpilot.dev/tuning-of"
ROLE = "tuning-load"
SHARED_PREFIX_GROUPS = 4
REQUEST_TIMEOUT_S = 300


def job_labels(name: str, revision: str | None = None) -> dict[str, str]:
    """Deliberately not the engine pods' labels: no Service, PDB or metrics scrape may select a load pod."""
    labels = {"app.kubernetes.io/name": "kvpilot-load", "app.kubernetes.io/managed-by": "kvpilot",
              "kvpilot.dev/role": ROLE, LABEL_TUNING_OF: name}
    if revision is not None:
        labels[LABEL_TRIAL] = revision
    return labels


def job_name(name: str, revision: str, step: int) -> str:
    return f"{name}-{revision}-s{step}"


def lengths(d: LengthDistribution) -> tuple[int, int]:
    """(min, max) of the uniform draw standing for `d`; bounds default to symmetric around the mean."""
    if d.kind == "fixed":
        return d.mean, d.mean
    if d.kind == "normal":
        half = round(math.sqrt(3) * (d.stddev or 0.0))
        lo, hi = max(1, d.mean - half), d.mean + half
        return max(lo, d.min or 1), min(hi, d.max) if d.max is not None else hi
    lo = d.min if d.min is not None else max(1, d.mean // 2)
    hi = d.max if d.max is not None else max(lo, 2 * d.mean - lo)
    return lo, hi


def workload_args(w: WorkloadSpec, num_prompts: int) -> list[str]:
    out_lo, out_hi = lengths(w.output_tokens)
    if w.shared_prefix_ratio > 0:
        mean_in = w.input_tokens.mean
        prefix = max(1, round(mean_in * w.shared_prefix_ratio))
        groups = min(SHARED_PREFIX_GROUPS, num_prompts)
        return ["--workload", "shared-prefix", "--num-groups", str(groups),
                "--prompts-per-group", str(math.ceil(num_prompts / groups)), "--prefix-len", str(prefix),
                "--suffix-len", str(max(1, mean_in - prefix)), "--output-len", str(out_lo), str(out_hi)]
    in_lo, in_hi = lengths(w.input_tokens)
    return ["--workload", "random", "--num-prompts", str(num_prompts), "--input-len", str(in_lo), str(in_hi),
            "--output-len", str(out_lo), str(out_hi)]


def num_prompts(rate: float, seconds: float) -> int:
    return max(1, round(rate * seconds))


def load_job(name: str, namespace: str, spec: InferenceServiceSpec, revision: str, step: int, rate: float,
             seconds: float, url: str) -> dict[str, Any]:
    n = num_prompts(rate, seconds)
    args = ["bench", "serve", "--url", url, "--model", spec.model.name, "--request-rate", f"{rate:.6g}",
            "--seed", str(step), *workload_args(spec.tuning.workload, n), "--timeout", str(REQUEST_TIMEOUT_S),
            "--no-progress", "--summary-file", SUMMARY_PATH]
    env: list[dict[str, Any]] = []
    if spec.engine.api_key_secret:
        key_ref = {"name": spec.engine.api_key_secret, "key": "api-key"}
        env.append({"name": "KVPILOT_API_KEY", "valueFrom": {"secretKeyRef": key_ref}})
    container = {
        "name": "load", "image": spec.engine.image, "command": ["kvpilot"], "args": args, "env": env,
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
        "terminationMessagePath": SUMMARY_PATH, "terminationMessagePolicy": "File",
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name, revision, step), "namespace": namespace, "labels": job_labels(name, revision),
            "annotations": {"kvpilot.dev/request-rate": f"{rate:.6g}", "kvpilot.dev/seconds": f"{seconds:g}"},
        },
        "spec": {
            "backoffLimit": 0,  # a failed step is a measurement, not something to retry blindly
            "activeDeadlineSeconds": int(seconds + REQUEST_TIMEOUT_S + 60),
            "template": {
                "metadata": {"labels": job_labels(name, revision)},
                "spec": restricted_pod(name, {"restartPolicy": "Never", "containers": [container]}),
            },
        },
    }


class LoadResult(BaseModel):
    """A finished step as the client saw it; `started_at` is None when the client never started."""

    succeeded: bool
    started_at: float | None = None
    completed: int = 0
    failed: int = 0
    failures: dict[str, int] = Field(default_factory=dict)
    message: str = ""


def finished(job: dict[str, Any]) -> tuple[bool, str] | None:
    """(succeeded, why) once the Job has its final condition; None while it runs."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c["type"] == "Complete", f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
    return None


def terminated(pods: list[dict[str, Any]]) -> bool:
    """Has a pod's container ended (so its termination message, if any, is in its status)?"""
    return any(((cs.get("state") or {}).get("terminated")) for p in pods
               for cs in (p.get("status") or {}).get("containerStatuses") or [])


def _summary(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            message = ((cs.get("state") or {}).get("terminated") or {}).get("message")
            if message:
                try:
                    return json.loads(message)
                except json.JSONDecodeError:
                    return {"error": f"unreadable termination message: {message[:200]}"}
    return None


def load_result(job: dict[str, Any], pods: list[dict[str, Any]], planned: int) -> LoadResult | None:
    """None while the Job runs; a Job that ended without a summary counts every planned request as failed."""
    done = finished(job)
    if done is None:
        return None
    succeeded, why = done
    summary = _summary(pods) or {"error": why or "the load Job ended without a summary"}
    if "completed" not in summary:
        reason = str(summary.get("error", ""))[:300]
        return LoadResult(succeeded=False, failed=planned, failures={"load_job": planned}, message=reason)
    return LoadResult(succeeded=succeeded, started_at=float(summary["started_at"]), completed=int(summary["completed"]),
                      failed=int(summary["failed"]), failures={str(k): int(v) for k, v in summary["failures"].items()},
                      message=why)
