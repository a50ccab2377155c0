"""The scenarios of issue 7, run in order against one InferenceService while the steady client streams.

Each returns a `Result`; its summary line holds requests sent / failed (steady client, during the
scenario), time to Ready and time to switch. A failed assertion fails the scenario, not the run.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kvpilot.operator.resources import LABEL_REVISION, deployment_name

from e2e.cluster import Cluster, condition, wait_for
from e2e.kubectl import kubectl_scenario
from e2e.rbac import rbac_result
from e2e.report import Result, first_failure
from e2e.router_scenarios import RouterScenarios
from e2e.traffic import Load, Outcome, SteadyClient, burst

NAME = "demo"
ENGINES = f"{NAME}-engines"
MODEL = "demo"
READY_TIMEOUT_S = 90
BROKEN_READY_TIMEOUT_S = 15
TRIALS = 4
TUNING_TIMEOUT_S = 360
# A small study the demo model on two shared cores gets through in a few minutes: the memory knob pinned
# (it does nothing on CPU), the serving configuration (4 sequences, 8192-token chunks) inside the space,
# and a declared arrival rate, so each trial is one load step (tests/operator covers the rate search).
TUNING: dict[str, Any] = {
    "enabled": True,
    "maxTrials": TRIALS,
    "trialDurationSeconds": 10,
    "searchSpace": {
        "gpuMemoryUtilization": {"fixed": 0.9},
        "maxNumSeqs": {"min": 2, "max": 8},
        "maxNumBatchedTokens": {"min": 64, "max": 8192},
    },
    "workload": {
        "inputTokens": {"kind": "fixed", "mean": 24},
        "outputTokens": {"kind": "fixed", "mean": 8},
        "requestRate": {"requestsPerSecond": 4},  # declared: one load step per trial, no rate search
    },
}
REFUSAL_LIMIT_S = 10.0  # a refusal must come fast; only contention on 2 shared cores makes it take seconds
QUEUE_FULL = "queue_full"  # the routers' code for a request past their queue's bound
# Per router: a burst of 32 overflows two of them; a request held from zero waits out an engine's cold start.
ROUTER = {"maxQueued": 8, "queueTimeoutS": 60}


def base_spec() -> dict[str, Any]:
    return {
        "model": {"name": MODEL, "uri": "demo", "revision": "r1"},
        "engine": {
            "image": "kvpilot/engine:cpu",
            "drainTimeoutSeconds": 3,
            "maxNumSeqs": 4,
            "maxModelLen": 1024,
            "extraArgs": ["--max-waiting-requests", "4"],
        },
        "resources": {"gpusPerReplica": 0, "cpu": "1", "memory": "2Gi", "shmSize": "64Mi"},
        "replicas": 1,
        "router": dict(ROUTER),
        "slo": {"ttftP95Ms": 5000, "itlP95Ms": 2000},
        "rollout": {
            "readyTimeoutSeconds": READY_TIMEOUT_S,
            "scaleDownDelaySeconds": 2,
            "verify": {"timeoutSeconds": 10, "smokeMaxTokens": 4},
        },
        "monitoring": {"serviceMonitor": False},  # measured with the operator's Prometheus
    }


class Scenarios:
    name, engines, router = NAME, ENGINES, ROUTER

    def __init__(self, cluster: Cluster, client: SteadyClient) -> None:
        self.c, self.client = cluster, client
        self.spec = base_spec()
        self.routing = RouterScenarios(self)

    async def _detail(self) -> str:
        status = await self.c.status(NAME)
        return f"status: {status}\noperator alive: {self.c.operator.alive()}"

    async def _patch_spec(self, change: Callable[[dict[str, Any]], None]) -> None:
        change(self.spec)
        await self.c.kube.patch("InferenceService", NAME, {"spec": copy.deepcopy(self.spec)})

    def _stable_revision(self) -> str | None:
        """The revision the routers serve: what the engines Service selects (the operator switches it)."""
        return self.c.proxy.selectors.get(ENGINES, {}).get(LABEL_REVISION)

    async def _switch(self, old: str, since: float, result: Result, existing: set[str]) -> None:
        """Times, from `since`, until a pod of a revision not in `existing` (what the node ran before the change,
        e.g. a revision still retiring) is ready (as first seen by this poll) and until the stable Service
        selects it (as the proxy sees it)."""
        started = since

        async def moved() -> bool:
            if result.to_ready_s is None and any(
                r.ready for name, r in self.c.node.runners.items() if self.c.node.revision.get(name) not in existing
            ):
                result.to_ready_s = time.monotonic() - started
            return self._stable_revision() not in (None, old)

        await wait_for(moved, 120, f"the stable Service to leave {old}", self._detail)
        result.to_switch_s = time.monotonic() - started
        new = self._stable_revision()

        async def recorded() -> bool:  # the operator switches the Service first, then writes status
            status = await self.c.status(NAME)
            return status.get("activeRevision") == new and status.get("phase") == "Ready"

        await wait_for(recorded, 30, f"status to show {new} active and Ready", self._detail)

    async def _drained(self, revision: str) -> None:
        """The old revision's pods terminated: their drain is part of what must lose nothing."""

        async def gone() -> bool:
            draining = [r for r in self.c.node.terminating if self.c.node.revision.get(r.name) == revision]
            return not self.c.node.pods_of(revision) and all(r.finished for r in draining)

        await wait_for(gone, 60, f"revision {revision}'s pods to terminate", self._detail)

    def _count(self, result: Result, outcomes: list[Outcome]) -> list[Outcome]:
        failures = [o for o in outcomes if not o.ok]
        result.sent, result.failed = len(outcomes), len(failures)
        return failures

    async def ready(self) -> Result:
        result = Result("apply -> Ready, SLOMet from Prometheus", False)
        manifest = {
            "apiVersion": "kvpilot.dev/v1alpha1",
            "kind": "InferenceService",
            "metadata": {"name": NAME},
            "spec": copy.deepcopy(self.spec),
        }
        await self.c.kube.create("InferenceService", manifest)

        async def is_ready() -> dict[str, Any] | None:
            status = await self.c.status(NAME)
            return status if status.get("phase") == "Ready" and self.c.proxy.endpoints.get(NAME) else None

        _, result.to_ready_s = await wait_for(is_ready, 120, "phase Ready", self._detail)
        mark = time.monotonic()
        self.client.start()

        async def slo_met() -> dict[str, Any] | None:
            cond = condition(await self.c.status(NAME), "SLOMet")
            return cond if cond.get("status") in ("True", "False") else None

        cond, _ = await wait_for(slo_met, 90, "SLOMet evaluated from Prometheus", self._detail)
        status = await self.c.status(NAME)
        failures = self._count(result, self.client.since(mark))
        result.passed = cond["status"] == "True" and not failures and result.sent > 0
        result.note = (
            f"SLOMet={cond['status']} ({cond.get('reason')}: {cond.get('message')}); "
            f"TTFT p95 {status.get('ttftP95Ms')} ms, {status.get('tokensPerSecond')} tok/s"
        )
        return result

    async def tuning(self) -> Result:
        result = Result(f"tuning >= {TRIALS} trials -> best promoted", False)
        old = (await self.c.status(NAME))["activeRevision"]
        mark = time.monotonic()
        await self._patch_spec(lambda s: s.update(tuning=TUNING))

        async def tuned() -> dict[str, Any] | None:
            status = await self.c.status(NAME)
            return status if condition(status, "Tuned").get("status") == "True" else None

        status, took = await wait_for(tuned, TUNING_TIMEOUT_S, "Tuned=True (best promoted)", self._detail)
        tuning, active = status.get("tuning") or {}, status["activeRevision"]
        best = tuning.get("best") or {}
        knobs = ("maxNumSeqs", "maxNumBatchedTokens")
        serving = {k: status["engineConfig"][k] for k in knobs}

        async def trials_gone() -> bool:
            deployments = await self.c.kube.list("Deployment", {"kvpilot.dev/inferenceservice": NAME})
            jobs = await self.c.kube.list("Job", {"kvpilot.dev/tuning-of": NAME})
            return not jobs and all("trial" not in d["metadata"]["name"] for d in deployments)

        await wait_for(trials_gone, 60, "trial Deployments and load Jobs removed", self._detail)
        # Pin what the study found and switch tuning off: the same engine settings, so no new rollout.
        await self._patch_spec(lambda s: (s["engine"].update(serving), s.update(tuning={"enabled": False})))

        async def untuned() -> dict[str, Any] | None:
            status = await self.c.status(NAME)
            return None if condition(status, "Tuned") or status.get("tuning") else status

        after, _ = await wait_for(untuned, 60, "tuning switched off", self._detail)
        failures = self._count(result, self.client.since(mark))
        result.passed = (
            not failures
            and tuning.get("trialsRun", 0) >= TRIALS
            and serving == {k: (best.get("config") or {}).get(k) for k in knobs}
            and after.get("activeRevision") == active
            and not after.get("candidateRevision")
        )
        result.to_switch_s = took
        result.note = (
            f"{tuning.get('trialsRun')} trials; best {serving}: {best.get('goodputTokensPerSecond')} tok/s, "
            f"TTFT p95 {best.get('ttftP95Ms')} ms, ITL p95 {best.get('itlP95Ms')} ms; "
            f"{'promoted ' + old + ' -> ' + active if active != old else 'the serving configuration was best'}; "
            f"pinned without a rollout: {after.get('activeRevision') == active}; best config {best.get('config')}"
            + first_failure(failures)
        )
        return result

    async def upgrade(self) -> Result:
        result = Result("model revision upgrade -> blue-green switch", False)
        old = (await self.c.status(NAME))["activeRevision"]
        mark, existing = time.monotonic(), set(self.c.node.revision.values())
        await self._patch_spec(lambda s: s["model"].update(revision="r2"))
        await self._switch(old, mark, result, existing)
        status = await self.c.status(NAME)
        await self._drained(old)
        failures = self._count(result, self.client.since(mark))
        result.passed = not failures and status.get("phase") == "Ready" and result.sent > 0
        result.note = f"{old} -> {status.get('activeRevision')}, old pods drained" + first_failure(failures)
        return result

    async def broken(self) -> Result:
        result = Result("broken revision (bad model path) -> automatic rollback", False)
        status = await self.c.status(NAME)
        active = status["activeRevision"]
        mark = time.monotonic()

        def breaks(s: dict[str, Any]) -> None:
            s["model"].update(uri="/models/does-not-exist", revision="r3-broken")
            s["rollout"]["readyTimeoutSeconds"] = BROKEN_READY_TIMEOUT_S

        await self._patch_spec(breaks)
        selectors: set[str | None] = set()

        async def rolled_back() -> dict[str, Any] | None:
            selectors.add(self._stable_revision())
            current = await self.c.status(NAME)
            return current if current.get("failedRevision") else None

        current, rolled_back_s = await wait_for(rolled_back, 90, "automatic rollback", self._detail)
        failed_revision = current["failedRevision"]
        routed = sum(n for pod, n in self.c.proxy.routed.items() if self.c.node.revision.get(pod) == failed_revision)
        routed += sum(self.c.node.revision.get(o.pod or "") == failed_revision for o in self.client.since(mark))
        degraded = condition(current, "Degraded")
        candidate_gone = await self.c.kube.get("Deployment", deployment_name(NAME, failed_revision)) is None

        def reverts(s: dict[str, Any]) -> None:
            s["model"].update(uri="demo", revision="r2")
            s["rollout"]["readyTimeoutSeconds"] = READY_TIMEOUT_S

        await self._patch_spec(reverts)

        async def ready_again() -> bool:
            return (await self.c.status(NAME)).get("phase") == "Ready"

        await wait_for(ready_again, 30, "phase Ready after the spec was reverted", self._detail)
        failures = self._count(result, self.client.since(mark))
        result.passed = (
            not failures
            and routed == 0
            and selectors == {active}
            and current.get("activeRevision") == active
            and str(degraded.get("reason", "")).startswith("RolledBack")
            and candidate_gone
        )
        result.note = (
            f"rolled back {rolled_back_s:.1f}s after the patch; {failed_revision} got {routed} "
            f"requests; stable selected {sorted(map(str, selectors))}; candidate deleted={candidate_gone}; "
            f"Degraded {degraded.get('reason')}" + first_failure(failures)
        )
        return result

    async def operator_restart(self) -> Result:
        result = Result("operator killed and restarted mid-rollout", False)
        old = (await self.c.status(NAME))["activeRevision"]
        mark, existing = time.monotonic(), set(self.c.node.revision.values())
        await self._patch_spec(lambda s: s["model"].update(revision="r4"))

        async def rolling() -> str | None:
            candidate = (await self.c.status(NAME)).get("candidateRevision")
            return candidate if candidate and self.c.node.pods_of(candidate) else None

        candidate, _ = await wait_for(rolling, 30, "the rollout to start", self._detail)
        self.c.operator.kill()
        await asyncio.sleep(2)
        self.c.operator.start()
        await self._switch(old, mark, result, existing)
        status = await self.c.status(NAME)
        await self._drained(old)
        failures = self._count(result, self.client.since(mark))
        result.passed = not failures and status.get("activeRevision") == candidate and status.get("phase") == "Ready"
        result.note = (
            f"killed during rollout of {candidate}; operator starts={self.c.operator.starts}; "
            f"active {status.get('activeRevision')}" + first_failure(failures)
        )
        return result

    async def _replicas(self, n: int) -> None:
        await self._patch_spec(lambda s: s.update(replicas=n))

        async def scaled() -> bool:
            return len(self.c.proxy.endpoints.get(ENGINES, [])) == n

        await wait_for(scaled, 60, f"{n} ready endpoints", self._detail)

    async def pod_killed(self) -> Result:
        result = Result("engine pod SIGKILLed under load behind the router", False)
        await self._replicas(2)
        active = (await self.c.status(NAME))["activeRevision"]
        victim = self.c.node.pods_of(active)[0]
        retries_before = await self.routing.router_metric("kvpilot:router_retries_total")
        mark = time.monotonic()
        # Longer streams beside the steady ones, so that some are mid-stream on the victim when it dies: it is
        # killed once the routers have requests in flight on it.
        load = Load(self.c.proxy.url(NAME), MODEL, workers=6, max_tokens=96)
        load.start()

        async def busy() -> bool:
            return await self.routing.in_flight_on(victim.name) >= 2

        await wait_for(busy, 30, f"requests in flight on {victim.name}", self._detail)
        victim.kill_container()

        async def replaced() -> bool:
            return victim.restarts >= 1 and victim.ready and len(self.c.proxy.endpoints.get(ENGINES, [])) == 2

        _, result.to_ready_s = await wait_for(replaced, 60, "the killed pod to be replaced", self._detail)
        await asyncio.sleep(1)
        outcomes = [*self.client.since(mark), *await load.stop()]
        failures = self._count(result, outcomes)
        retried = await self.routing.router_metric("kvpilot:router_retries_total") - retries_before
        mid_stream = [o for o in failures if o.cut_mid_stream]
        before_streaming = [o for o in failures if not o.cut_mid_stream]
        hangs = [o for o in failures if o.hang]
        await self._replicas(1)
        hit = len(mid_stream) + retried  # a kill that hit nothing would prove nothing
        result.passed = not before_streaming and not hangs and result.sent > 0 and hit > 0
        result.note = (
            f"{len(outcomes)} requests; {len(before_streaming)} failed before streaming (must be 0); "
            f"{len(mid_stream)} cut mid-stream on {sorted({str(o.pod) for o in mid_stream})}, each ended with an "
            f"error event; {retried:g} retried on another engine before their first byte; hangs {len(hangs)}"
            + first_failure(before_streaming)
        )
        return result

    async def overload(self) -> Result:
        result = Result("overload -> the routers' bounded queue, then 429 with Retry-After", False)
        mark = time.monotonic()
        outcomes = await burst(self.c.proxy.url(NAME), MODEL, n=32, max_tokens=16, timeout_s=40)
        refused = [o for o in outcomes if o.status in (429, 503)]
        accepted = [o for o in outcomes if o.status == 200]
        bad = [o for o in outcomes if o not in refused and o not in accepted]
        no_retry_after = [o for o in refused if not o.retry_after]
        incomplete = [o for o in accepted if not o.ok]
        # Past the queue's bound the answer is at once; a request that waited its queue timeout is refused later.
        at_the_bound = [o for o in refused if QUEUE_FULL in o.error]
        slowest_refusal = max((o.ended - o.started for o in at_the_bound), default=0.0)
        steady = self.client.since(mark)
        failures = self._count(result, steady)
        steady_bad = [o for o in failures if o.status not in (429, 503) or not o.retry_after]
        result.passed = (
            bool(at_the_bound)
            and slowest_refusal < REFUSAL_LIMIT_S
            and not (bad or no_retry_after or incomplete or steady_bad)
        )
        result.note = (
            f"burst 32: {len(accepted)} accepted (all complete: {not incomplete}), {len(refused)} refused "
            f"({len(at_the_bound)} at the queue's bound, slowest {slowest_refusal:.2f}s; all with Retry-After: "
            f"{not no_retry_after}), {len(bad)} other; steady failures all 429/503+Retry-After: {not steady_bad}"
        )
        return result

    async def kubectl(self) -> Result:
        return await kubectl_scenario(self.c, self.spec, READY_TIMEOUT_S)

    async def rbac(self) -> Result:
        """Last: every call the operator made in the run is in."""
        return rbac_result(self.c.api.calls)

    def all(self) -> list[Callable[[], Awaitable[Result]]]:
        return [
            self.ready,
            self.tuning,
            self.upgrade,
            self.broken,
            self.operator_restart,
            self.pod_killed,
            self.overload,
            self.routing.affinity,
            self.routing.autoscaling,
            self.kubectl,
            self.rbac,
        ]
