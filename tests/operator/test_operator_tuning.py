"""Operator-driven tuning through the real kopf operator: trial revisions created, loaded, measured, removed;
the study persisted in its ConfigMap and continued across an operator restart; the best promoted by blue-green.

The cluster's controllers are doubles: Deployments become ready (a trial with too many sequences for its
KV pool crash-loops instead), and load Jobs complete with the client summary a real `kvpilot bench serve`
pod leaves in its termination message. Prometheus is a double answering the trial's PromQL from a
synthetic response surface: capacity (req/s) grows with max_num_seqs up to 128 and suffers above a
2,048-token prefill chunk; beyond capacity TTFT p95 blows through the SLO.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from kvpilot.engine.config import EngineConfig
from kvpilot.operator.config import OperatorConfig

from .conftest import NAMESPACE, isvc
from .emulator import Emulator
from .flows import MERGE, condition, create, deploy_ready, deployment_names, event_reasons, isvc_status, mark_ready
from .harness import FakePrometheus, PodDouble, eventually, wait_passes

OUTPUT_TOKENS = 32
CRASHING_SEQS = 200  # trials at or above this crash-loop: "the KV pool is too small for that many sequences"


def capacity(seqs: int, chunk: int) -> float:
    return 2.0 + 10.0 * min(seqs, 128) / 128 * (1.0 if chunk <= 2048 else 0.6)


class SurfacePrometheus(FakePrometheus):
    """Answers for `revision="..."` from what the last load step of that revision offered."""

    def __init__(self) -> None:
        super().__init__()
        self.offered: dict[str, tuple[float, float]] = {}  # revision -> (request rate, capacity)
        self.live_share: float | None = None  # share of live requests within every bucket bound (None: no traffic)

    def value(self, query: str) -> float | list[tuple[dict[str, str], float]] | None:
        if query.startswith("sum by (le) (increase("):  # live SLO attainment
            share = self.live_share
            return None if share is None else [({"le": "0.001"}, 100 * share), ({"le": "+Inf"}, 100.0)]
        revision = re.search(r'revision="([^"]+)"', query)
        rate, cap = self.offered.get(revision.group(1) if revision else "", (1.0, 10.0))
        overloaded = rate > cap
        if query.startswith("count("):
            return 1.0
        if "time_to_first_token" in query:
            return 3.0 if overloaded else 0.05 + 0.2 * rate / cap
        if "inter_token_latency" in query:
            return 0.02
        if "generation_tokens" in query:
            window = re.search(r"offset (\d+)ms", query)
            seconds = int(window.group(1)) / 1000 if window else 1.0
            return min(rate, cap) * OUTPUT_TOKENS * seconds
        return None


def _arg(args: list[str], flag: str) -> str:
    """`--flag=value` (the engine's arguments; absent: the engine's default) or `--flag value` (the load
    generator's)."""
    joined = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    if joined:
        return joined[0]
    if flag in args:
        return args[args.index(flag) + 1]
    return str(EngineConfig.model_fields[flag.removeprefix("--").replace("-", "_")].default)


class Controllers:
    """The Deployment controller and the Job controller, as far as the operator can tell them apart."""

    def __init__(self, api: httpx.AsyncClient, em: Emulator, prometheus: SurfacePrometheus) -> None:
        self.api, self.em, self.prometheus = api, em, prometheus
        self.promotions_start = True  # False: only the first serving revision ever becomes ready
        self.done: set[str] = set()
        self.jobs_seen: list[str] = []
        self.serving: list[str] = []

    async def run(self) -> None:
        while True:
            for deployment in self.em.all("deployments", NAMESPACE):
                await self._deployment(deployment)
            for job in self.em.all("jobs", NAMESPACE):
                await self._job(job)
            await asyncio.sleep(0.05)

    async def _deployment(self, d: dict[str, Any]) -> None:
        name = d["metadata"]["name"]
        if name in self.done:
            return
        self.done.add(name)
        revision = d["metadata"]["labels"].get("kvpilot.dev/revision")
        if revision is None:  # the routers
            await mark_ready(self.api, self.em, name)
            return
        args = d["spec"]["template"]["spec"]["containers"][0]["args"]
        if revision.startswith("trial-") and int(_arg(args, "--max-num-seqs")) >= CRASHING_SEQS:
            crashing = {"name": "engine", "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}
            await self._pod(f"{name}-x", d["spec"]["template"]["metadata"]["labels"], None,
                            {"phase": "Running", "containerStatuses": [crashing]})
            return
        if not revision.startswith("trial-"):
            self.serving.append(name)
            if len(self.serving) > 1 and not self.promotions_start:
                return
        await mark_ready(self.api, self.em, name)

    async def _job(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        if name in self.done:
            return
        self.done.add(name)
        self.jobs_seen.append(name)
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        revision = job["metadata"]["labels"]["kvpilot.dev/trial"]
        engine = self.em.find("deployments", NAMESPACE, f"llm-{revision}")
        assert engine is not None, f"load Job {name} for a revision with no Deployment"
        engine_args = engine["spec"]["template"]["spec"]["containers"][0]["args"]
        cap = capacity(int(_arg(engine_args, "--max-num-seqs")), int(_arg(engine_args, "--max-num-batched-tokens")))
        rate, n = float(_arg(args, "--request-rate")), int(_arg(args, "--num-prompts"))
        self.prometheus.offered[revision] = (rate, cap)
        seconds = float(job["metadata"]["annotations"]["kvpilot.dev/seconds"])
        summary = {"started_at": time.time() - seconds, "duration_s": seconds, "num_requests": n, "completed": n,
                   "failed": 0, "failures": {}, "output_throughput": min(rate, cap) * OUTPUT_TOKENS}
        terminated = {"exitCode": 0, "reason": "Completed", "message": json.dumps(summary)}
        finished = {"phase": "Succeeded", "containerStatuses": [{"name": "load", "state": {"terminated": terminated}}]}
        labels = {**job["spec"]["template"]["metadata"]["labels"], "job-name": name}  # as the Job controller sets
        await self._pod(f"{name}-abcde", labels, job, finished)
        status = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True", "reason": "Completed"}]}
        path = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}/status"
        response = await self.api.patch(path, json={"status": status}, headers=MERGE)
        assert response.status_code == 200, response.text

    async def _pod(
        self, name: str, labels: dict[str, str], owner: dict[str, Any] | None, status: dict[str, Any]
    ) -> None:
        meta: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "labels": labels}
        if owner is not None:
            meta["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": owner["metadata"]["name"],
                                        "uid": owner["metadata"]["uid"], "controller": True}]
        pods = f"/api/v1/namespaces/{NAMESPACE}/pods"
        response = await self.api.post(pods, json={"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                                                   "spec": {"containers": [{"name": "c", "image": "x"}]}})
        assert response.status_code in (200, 201), response.text
        response = await self.api.patch(f"{pods}/{name}/status", json={"status": status}, headers=MERGE)
        assert response.status_code == 200, response.text


@pytest.fixture()
def surface() -> Iterator[SurfacePrometheus]:
    prometheus = SurfacePrometheus()
    yield prometheus
    prometheus.close()


@pytest.fixture()
async def controllers(api, emulator, surface) -> AsyncIterator[Controllers]:
    """The Deployment and Job controller doubles, running on the test's event loop for the whole test."""
    running = Controllers(api, emulator[0], surface)
    task = asyncio.get_running_loop().create_task(running.run())
    yield running
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest.fixture()
def operator_config(pods: PodDouble, surface: SurfacePrometheus) -> OperatorConfig:
    return OperatorConfig(resync_seconds=0.2, service_url_template=pods.url_template, scrape_interval_seconds=0.05,
                          allowed_prometheus_urls=[surface.url])


def tuned_isvc(prometheus_url: str) -> dict[str, Any]:
    return isvc(
        "llm",
        rollout={"readyTimeoutSeconds": 30, "scaleDownDelaySeconds": 0},
        engine={"maxNumSeqs": 256, "maxNumBatchedTokens": 8192, "gpuMemoryUtilization": 0.9},
        slo={"ttftP95Ms": 500, "itlP95Ms": 50},
        monitoring={"prometheusUrl": prometheus_url},
        tuning={"enabled": True, "maxTrials": 5, "trialDurationSeconds": 10,
                "workload": {"inputTokens": {"kind": "fixed", "mean": 64},
                             "outputTokens": {"kind": "fixed", "mean": OUTPUT_TOKENS}}},
    )


def study(em: Emulator) -> dict[str, Any]:
    config_map = em.find("configmaps", NAMESPACE, "llm-tuning")
    return json.loads(config_map["data"]["study.json"]) if config_map else {}


async def test_tuning_trials_persist_across_restart_and_the_best_is_promoted(
    emulator, start_operator, api, pods, surface, controllers
):
    em, _ = emulator
    op = start_operator()
    await create(api, tuned_isvc(surface.url))
    live = await eventually(lambda: isvc_status(em, "llm").get("activeRevision"), what="first revision live")

    # Trial 0 is the serving configuration (256 sequences): it crash-loops, so it is infeasible.
    await eventually(lambda: len(study(em).get("study", {}).get("records", [])) >= 2, timeout=60,
                     what="two trials recorded", detail=lambda: json.dumps(isvc_status(em, "llm"))[:3000])
    await op.stop()
    before = study(em)["study"]["records"]
    first = before[0]
    assert first["params"]["max_num_seqs"] == 256 and first["outcome"]["status"] == "infeasible"
    assert "CrashLoopBackOff" in first["outcome"]["reason"]

    start_operator()  # a new operator process continues the same study
    await eventually(lambda: condition(em, "llm", "Tuned") and condition(em, "llm", "Tuned")["status"] == "True",
                     timeout=90, what="Tuned", detail=lambda: json.dumps(isvc_status(em, "llm"))[:3000])
    records = study(em)["study"]["records"]
    assert [r["params"] for r in records[: len(before)]] == [r["params"] for r in before]
    ran = [r for r in records if r["ran"]]
    assert len(ran) == 5
    feasible = [r for r in ran if r["outcome"]["status"] != "infeasible"]
    assert feasible and all(r["params"]["max_num_seqs"] < CRASHING_SEQS for r in feasible)
    revisions = [r["note"] for r in ran]
    assert len(set(revisions)) == len(revisions) and all(r.startswith("trial-") for r in revisions)

    status = isvc_status(em, "llm")
    tuning = status["tuning"]
    assert tuning["state"] == "Done" and tuning["trialsRun"] == 5 and tuning["studyConfigMap"] == "llm-tuning"
    best = tuning["best"]
    ok = [r for r in ran if r["outcome"]["status"] == "ok"]
    top = max(r["outcome"]["goodput_per_gpu"] for r in ok)
    assert best["goodputTokensPerSecond"] == pytest.approx(top, rel=1e-3)
    assert best["ttftP95Ms"] is not None and best["itlP95Ms"] is not None
    # Promoted through blue-green: a new revision, verified through the preview Service, with the best knobs.
    assert status["activeRevision"] != live
    assert status["engineConfig"]["maxNumSeqs"] == best["config"]["maxNumSeqs"]
    assert any(service == "llm-preview" for service, _ in pods.calls)
    history = [(h["revision"], h["result"]) for h in status["history"]]
    assert history[-1] == (status["activeRevision"], "Promoted")

    # Every trial's children are gone: Deployments, the trial Service, the load Jobs.
    await eventually(lambda: all(not d.startswith("llm-trial-") for d in deployment_names(em)),
                     what="trial Deployments removed")
    assert em.find("services", NAMESPACE, "llm-tuning") is None
    await eventually(lambda: not em.all("jobs", NAMESPACE), what="load Jobs removed")
    assert len(controllers.jobs_seen) >= 5  # at least one load step per feasible trial
    reasons = set(event_reasons(em, "llm"))
    assert {"TrialStarted", "TrialFinished", "TuningPromoted"} <= reasons
    # One Phase Event per real transition of the stored phase, though tuning and the rollout both speak each pass.
    phases = [v.get("status", {}).get("phase") for v in em.versions("inferenceservices", NAMESPACE, "llm")]
    changes = [b for a, b in itertools.pairwise(phases) if b and a != b]
    assert changes.count("Tuning") >= 1 and changes.count("Ready") >= 2  # Ready, Tuning for the study, Ready
    await eventually(lambda: [r for r in event_reasons(em, "llm") if r.startswith("Phase")].count("PhaseReady")
                     >= changes.count("Ready"), what="a PhaseReady Event per transition to Ready")
    posted = [r.removeprefix("Phase") for r in event_reasons(em, "llm") if r.startswith("Phase")]
    assert {p: posted.count(p) for p in ("Ready", "Tuning")} == {p: changes.count(p) for p in ("Ready", "Tuning")}


async def test_tuning_waits_for_prometheus(emulator, start_operator, api, surface):
    em, _ = emulator
    start_operator()
    body = tuned_isvc(surface.url)
    del body["spec"]["monitoring"]
    await create(api, body)
    await deploy_ready(api, em, "llm")
    tuned = await eventually(lambda: condition(em, "llm", "Tuned"), what="Tuned condition")
    assert (tuned["status"], tuned["reason"]) == ("False", "PrometheusRequired")
    assert not [d for d in deployment_names(em) if "trial" in d]


async def test_disabling_tuning_removes_the_study(emulator, start_operator, api, surface, controllers):
    em, _ = emulator
    start_operator()
    await create(api, tuned_isvc(surface.url))
    await eventually(lambda: study(em).get("trial"), timeout=30, what="a trial in flight")
    response = await api.patch(f"/apis/kvpilot.dev/v1alpha1/namespaces/{NAMESPACE}/inferenceservices/llm",
                               json={"spec": {"tuning": {"enabled": False}}}, headers=MERGE)
    assert response.status_code == 200
    await eventually(lambda: em.find("configmaps", NAMESPACE, "llm-tuning") is None, what="study removed")
    await eventually(lambda: all("trial" not in d for d in deployment_names(em)), what="trial removed")
    await eventually(lambda: condition(em, "llm", "Tuned") is None, what="Tuned condition dropped")
    assert isvc_status(em, "llm").get("tuning") is None




async def test_a_promotion_the_rollout_rolls_back_is_dropped(emulator, start_operator, api, surface, controllers):
    em, _ = emulator
    controllers.promotions_start = False
    start_operator()
    body = tuned_isvc(surface.url)
    body["spec"]["rollout"]["readyTimeoutSeconds"] = 3
    # The serving 256 sequences lie outside the space: every trial differs from it, so the best is a new revision.
    body["spec"]["tuning"].update(maxTrials=2, searchSpace={"maxNumSeqs": {"min": 8, "max": 64}})
    await create(api, body)
    live = await eventually(lambda: isvc_status(em, "llm").get("activeRevision"), what="first revision live")
    tuned = await eventually(lambda: (c := condition(em, "llm", "Tuned")) and c["reason"] == "TuningFailed" and c,
                             timeout=60, what="Tuned=False after the rollback",
                             detail=lambda: json.dumps(isvc_status(em, "llm"))[:3000])
    assert "rolled back" in tuned["message"]
    status = isvc_status(em, "llm")
    assert status["activeRevision"] == live and study(em)["promoted"] is None
    assert status["tuning"]["state"] == "Failed" and status["tuning"]["trialsRun"] == 2
    assert len(controllers.serving) == 2  # the promotion was tried, as a blue-green candidate
    await eventually(lambda: isvc_status(em, "llm")["engineConfig"]["maxNumSeqs"] == 256, what="user engine serves")
    assert "TuningPromotionRolledBack" in set(event_reasons(em, "llm"))


async def test_live_attainment_below_the_threshold_starts_the_study_over(
    emulator, start_operator, api, surface, controllers
):
    em, _ = emulator
    start_operator()
    body = tuned_isvc(surface.url)
    body["spec"]["tuning"].update(maxTrials=2, retuneBelowAttainment=0.9,
                                  searchSpace={"maxNumSeqs": {"min": 8, "max": 64}})
    await create(api, body)
    await eventually(lambda: (c := condition(em, "llm", "Tuned")) and c["status"] == "True", timeout=60,
                     what="first study done", detail=lambda: json.dumps(isvc_status(em, "llm"))[:3000])
    surface.live_share = 0.95  # within the SLO often enough: the study stays done
    await wait_passes(em, "llm", 5)
    assert study(em)["phase"] == "Done"
    surface.live_share = 0.5
    restarted = await eventually(lambda: (s := study(em)) and s["phase"] != "Done" and s, timeout=30,
                                 what="the study to start over")
    assert "live SLO attainment 50.0%" in restarted["message"]
    assert len(restarted["study"]["records"]) <= 1  # a fresh study (its first trial may have started)
