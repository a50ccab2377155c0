"""The router's and the autoscaler's e2e scenarios: prefix affinity against round-robin, and scaling up, down,
to zero and back from it, each printing its figures. They drive the same cluster as scenarios.py, through it.

Round-robin is the local Service proxy sending straight to the `<name>-engines` Service's pods, one request
each in turn, as a ClusterIP Service without the routers would; the routed traffic goes through the stable
Service, that is the routers. Prefix hits are the engines' own counters, read from each engine pod's /metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from typing import Any

import httpx
from kvpilot.operator.router_resources import COMPONENT

from e2e.cluster import wait_for
from e2e.pod import PodRunner
from e2e.report import Result, first_failure
from e2e.traffic import Load, Outcome, burst, stream_completion

GROUPS = 8  # not a multiple of the 3 replicas, so that round-robin does not pin each group to one engine
ROUNDS = 6
PREFIX_WORDS = 200  # about 890 demo tokens (56 blocks of 16), inside the e2e engines' maxModelLen of 1024:
# long enough that recomputing it costs more than the routers' hop
WORDS = ("alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta", "rho", "tau")
KV_BLOCKS = 192  # per engine: about three groups' prefixes (56 blocks each) with their requests running
HIT_RATIO_TARGET = 2.0
SCALE_UP_LIMIT_S = 90.0  # the stated time: demand seen (one window) plus two engines' cold start, on 2 cores
# A paced light load (about 16 output tokens/s) fits one replica; six unpaced streams of 32 tokens need three.
AUTOSCALING = {"minReplicas": 1, "maxReplicas": 3, "goodputPerReplica": 40, "targetUtilization": 1.0,
               "windowSeconds": 10, "scaleDownStabilizationSeconds": 15}


def _prompts(seed: int) -> list[list[str]]:
    """GROUPS groups of ROUNDS prompts, each group sharing a long prefix; a fresh seed, fresh prefixes."""
    rng = random.Random(seed)
    out = []
    for g in range(GROUPS):
        prefix = " ".join(rng.choice(WORDS) for _ in range(PREFIX_WORDS))
        out.append([f"{prefix} {g} {r} {rng.choice(WORDS)}" for r in range(ROUNDS)])
    return out


def _placement(outcomes: list[Outcome]) -> str:
    """How a run's groups sat on the engines: groups per engine in the last round, and how often a group's
    next round went to another engine than its last (each such move recomputes its prefix)."""
    rounds = [outcomes[r * GROUPS:(r + 1) * GROUPS] for r in range(ROUNDS)]
    last = [o.pod for o in rounds[-1]]
    per_engine = sorted((last.count(p) for p in set(last)), reverse=True)
    moves = sum(a.pod != b.pod for before, after in itertools.pairwise(rounds)
                for a, b in zip(before, after, strict=True))
    return f"groups per engine {'/'.join(map(str, per_engine))}, {moves} moves"


def _ttft_ms(outcomes: list[Outcome]) -> float | None:
    ttfts = [(o.first_event - o.started) * 1000 for o in outcomes if o.ok and o.first_event is not None]
    return statistics.median(ttfts) if ttfts else None


class RouterScenarios:
    """Bound to the Scenarios object (`s`) for its cluster, steady client and helpers."""

    def __init__(self, s: Any) -> None:
        self.s = s
        self.c = s.c

    def _routers(self) -> list[PodRunner]:
        return [r for pod, r in list(self.c.node.runners.items())
                if self.c.node.labels.get(pod, {}).get(COMPONENT) == "router" and r.ready]

    async def in_flight_on(self, engine: str) -> int:
        """Requests the routers have on one engine now (their /router/backends)."""
        async with httpx.AsyncClient(timeout=5) as http:
            pools = [(await http.get(f"{r.url}/router/backends")).json() for r in self._routers()]
        return sum(b["in_flight"] for pool in pools for b in pool if b["name"] == engine)

    async def router_metric(self, name: str) -> float:
        """A counter summed over the router pods, read from their /metrics."""
        total = 0.0
        async with httpx.AsyncClient(timeout=5) as http:
            for runner in self._routers():
                for line in (await http.get(f"{runner.url}/metrics")).text.splitlines():
                    if line.split("{", 1)[0].split(" ", 1)[0] == name:
                        total += float(line.rsplit(" ", 1)[1])
        return total

    async def _engine_hits(self, revision: str) -> tuple[float, float]:
        """(prefix-cache hit tokens, looked-up tokens) summed over the revision's engines, from their /metrics."""
        hits = queries = 0.0
        async with httpx.AsyncClient(timeout=5) as http:
            for runner in self.c.node.pods_of(revision):
                for line in (await http.get(f"{runner.url}/metrics")).text.splitlines():
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    if name == "kvpilot:prefix_cache_hits_total":
                        hits += float(line.rsplit(" ", 1)[1])
                    elif name == "kvpilot:prefix_cache_queries_total":
                        queries += float(line.rsplit(" ", 1)[1])
        return hits, queries

    async def _shared_prefix_run(self, url: str, revision: str, seed: int) -> tuple[float, float | None, list[Outcome]]:
        """Each round sends one request per group at once; returns (hit rate, TTFT p50 ms, outcomes)."""
        groups = _prompts(seed)
        hits0, queries0 = await self._engine_hits(revision)
        outcomes: list[Outcome] = []
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=3)) as http:
            for r in range(ROUNDS):
                outcomes += await asyncio.gather(*(stream_completion(http, url, "demo", 4, 30, prompt=g[r])
                                                   for g in groups))
        hits1, queries1 = await self._engine_hits(revision)
        rate = (hits1 - hits0) / (queries1 - queries0) if queries1 > queries0 else 0.0
        return rate, _ttft_ms(outcomes), outcomes

    async def _revision_with(self, change: Any, replicas: int) -> str:
        """Apply an engine change as a blue-green rollout at `replicas`, wait until it serves and every router has
        its pods; returns the new active revision."""
        old = (await self.c.status(self.s.name))["activeRevision"]
        mark, existing = time.monotonic(), set(self.c.node.revision.values())
        await self.s._patch_spec(lambda spec: (change(spec["engine"]), spec.update(replicas=replicas)))
        await self.s._switch(old, mark, Result("switch", None), existing)
        await self.s._drained(old)
        revision = (await self.c.status(self.s.name))["activeRevision"]

        async def routers_see_all() -> bool:
            want = {r.name for r in self.c.node.pods_of(revision) if r.ready}
            async with httpx.AsyncClient(timeout=5) as http:
                pools = [(await http.get(f"{r.url}/router/backends")).json() for r in self._routers()]
            return len(want) == replicas and all({b["name"] for b in pool} >= want for pool in pools)

        await wait_for(routers_see_all, 60, f"every router to see {replicas} engines", self.s._detail)
        return revision

    async def affinity(self) -> Result:
        """Under cache pressure, as with many prompt groups in production: each engine's pool (KV_BLOCKS) holds
        about three of the eight groups' prefixes, so round-robin, which shows every engine every group, keeps
        evicting them, while the routers give each engine its own groups."""
        result = Result("3 replicas, shared-prefix traffic: routers vs round-robin", False)
        base_args = self.s.spec["engine"]["extraArgs"]
        # Room to wait for every request of a round on one engine: round-robin reaches the engines with no queue
        # in front, and this compares caches, not the engines' admission bound (the overload scenario's).
        wide = ["--max-waiting-requests", str(2 * GROUPS)]
        revision = await self._revision_with(lambda engine: engine.update(numKvBlocks=KV_BLOCKS, extraArgs=wide), 3)
        try:
            rr_rate, rr_ttft, rr = await self._shared_prefix_run(self.c.proxy.url(self.s.engines), revision, seed=1)
            routed_rate, routed_ttft, routed = await self._shared_prefix_run(self.c.proxy.url(self.s.name), revision, 2)
        finally:
            await self._revision_with(lambda engine: engine.update(numKvBlocks=None, extraArgs=base_args), 1)
            self.s.spec["engine"].pop("numKvBlocks", None)
        failures = self.s._count(result, [*rr, *routed])
        ratio = routed_rate / rr_rate if rr_rate else float("inf")
        faster = routed_ttft is not None and rr_ttft is not None and routed_ttft < rr_ttft
        result.passed = not failures and ratio >= HIT_RATIO_TARGET and faster
        result.note = (f"{GROUPS} groups x {ROUNDS} rounds, {KV_BLOCKS} KV blocks per engine: prefix hit rate "
                       f"{routed_rate:.1%} routed vs {rr_rate:.1%} round-robin ({ratio:.1f}x, target >= "
                       f"{HIT_RATIO_TARGET:g}x); TTFT p50 {routed_ttft or 0:.1f} ms routed vs {rr_ttft or 0:.1f} ms "
                       f"round-robin (lower: {faster}); routed {_placement(routed)}" + first_failure(failures))
        return result

    async def _cold_start(self, since: float) -> tuple[float, float]:
        """Seconds from `since` until an engine pod exists (the autoscaler saw the queued request and the node made
        the pod) and until one is Ready (the engine's own cold start on top)."""
        async def created() -> bool:
            revision = self.s._stable_revision()
            return bool(revision and self.c.node.pods_of(revision))

        _, pod_s = await wait_for(created, 60, "an engine pod from zero", self.s._detail)
        _, ready_s = await wait_for(lambda: _at_least(self._engines_ready(), 1), 60, "a Ready engine from zero",
                                    self.s._detail)
        return pod_s, pod_s + ready_s

    async def _no_engine_pod(self) -> bool:
        """Zero replicas: no engine pod left, draining ones included."""
        revision = self.s._stable_revision()
        draining = [r for r in self.c.node.terminating if self.c.node.revision.get(r.name) == revision]
        return bool(revision) and not self.c.node.pods_of(revision) and all(r.finished for r in draining)

    def _engines_ready(self) -> int:
        return len(self.c.proxy.endpoints.get(self.s.engines, []))

    async def autoscaling(self) -> Result:
        """Demand ramps up then down, then idles to zero and comes back. The steady client pauses meanwhile: its
        demand would depend on how fast the engines answer it, a paced light load does not."""
        result = Result("autoscaling: ramp up and down, to zero and back through the routers' queue", False)
        url = self.c.proxy.url(self.s.name)
        light = Load(url, "demo", workers=1, max_tokens=4, pause_s=0.25)
        heavy = Load(url, "demo", workers=6, max_tokens=32)
        await self.s.client.stop()
        try:
            await self._autoscale(result, url, light, heavy)
        finally:  # whatever happened, the later scenarios get the service as it was
            await heavy.stop()
            await light.stop()
            self.s.client.resume()
            await self.s._patch_spec(lambda spec: spec.update(autoscaling=None))
            self.s.spec.pop("autoscaling", None)
            await self.s._replicas(1)
        return result

    async def _autoscale(self, result: Result, url: str, light: Load, heavy: Load) -> None:
        light.start()
        await self.s._patch_spec(lambda spec: spec.update(autoscaling=dict(AUTOSCALING)))
        heavy.start()
        _, up_s = await wait_for(lambda: _at_least(self._engines_ready(), 3), SCALE_UP_LIMIT_S,
                                 "3 replicas under demand", self.s._detail)
        load = await heavy.stop()
        in_mark = time.monotonic()
        _, down_s = await wait_for(lambda: _at_most(self._engines_ready(), 1), 120, "back to 1 replica",
                                   self.s._detail)
        await asyncio.sleep(2)  # the last removed pod's drain
        paced = await light.stop()
        scale_in = [o for o in paced if o.started >= in_mark]
        # While replicas start, the engines' own queues may be full: a 429 or 503 with Retry-After is backpressure
        # (counted), anything else a failure. During scale-in nothing may fail at all.
        pushed_back = [o for o in [*load, *paced] if not o.ok and o.status in (429, 503) and o.retry_after]
        ramp_failures = [o for o in [*load, *paced] if not o.ok and o not in pushed_back]
        scale_in_failed = [o for o in scale_in if not o.ok]

        await self.s._patch_spec(lambda spec: spec["autoscaling"].update(minReplicas=0))  # idle: nothing arrives
        _, zero_s = await wait_for(self._no_engine_pod, 120, "zero engine pods", self.s._detail)
        bound = 2 * self.s.router["maxQueued"]  # two routers, each its own queue
        sent_at = time.monotonic()
        first_task = asyncio.ensure_future(_one(url))
        cold = asyncio.ensure_future(self._cold_start(sent_at))
        await asyncio.sleep(0.2)
        crowd = await burst(url, "demo", n=bound + 8, max_tokens=4, timeout_s=60)
        first = await first_task
        pod_s, ready_s = await cold
        refused = [o for o in crowd if o.status == 429]
        served = [o for o in crowd if o.ok]
        other = [o for o in crowd if not o.ok and o.status != 429]

        cold_s = first.ended - first.started
        result.sent = len(load) + len(paced) + len(crowd) + 1
        result.failed = len(ramp_failures) + len(pushed_back) + len(scale_in_failed) + len(other) + (not first.ok)
        result.passed = (first.ok and not ramp_failures and not scale_in_failed and bool(refused)
                         and all(o.retry_after for o in refused) and not other and up_s <= SCALE_UP_LIMIT_S)
        result.note = (
            f"1 -> 3 replicas {up_s:.0f}s after demand began (limit {SCALE_UP_LIMIT_S:.0f}s), {len(load)} requests "
            f"({len(pushed_back)} pushed back with 429/503 + Retry-After while replicas started, "
            f"{len(ramp_failures)} failed otherwise); "
            f"3 -> 1 {down_s:.0f}s after it stopped (window {AUTOSCALING['scaleDownStabilizationSeconds']}s), "
            f"{len(scale_in_failed)} of {len(scale_in)} failed during scale-in; idle -> 0 in {zero_s:.0f}s; "
            f"from zero the first request waited {cold_s:.1f}s and {'succeeded' if first.ok else 'FAILED'} (its "
            f"pod created {pod_s:.1f}s after it was sent, Ready {ready_s - pod_s:.1f}s later); a burst "
            f"of {len(crowd)} past the bound of {bound}: {len(served)} served, {len(refused)} got 429 "
            f"({sum('queue_full' in o.error for o in refused)} at the routers' bound; all with "
            f"Retry-After: {all(o.retry_after for o in refused)}), {len(other)} other"
            + first_failure([*ramp_failures, *scale_in_failed, *other, *([] if first.ok else [first])])
        )


async def _at_least(n: int, want: int) -> bool:
    return n >= want


async def _at_most(n: int, want: int) -> bool:
    return n <= want


async def _one(url: str) -> Outcome:
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=3)) as http:
        return await stream_completion(http, url, "demo", 4, 60)
