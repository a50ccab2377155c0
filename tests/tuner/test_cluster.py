"""The in-cluster driver as a pure state machine, against a simulated operator (no Kubernetes)."""

from __future__ import annotations

import datetime as dt

import pytest
from kvpilot.tuner.cluster import (
    ClusterSettings,
    ClusterState,
    DeleteCandidate,
    DeployCandidate,
    Observation,
    Promote,
    RunLoad,
    advance,
)
from kvpilot.tuner.metrics import WindowMetrics
from kvpilot.tuner.objective import SLO, RateSearchSettings
from kvpilot.tuner.space import gpu_space
from kvpilot.tuner.study import StudyState

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SETTINGS = ClusterSettings(enabled=True, max_trials=5, slo=SLO(ttft_p95_ms=500, itl_p95_ms=50),
                           rate=RateSearchSettings(start_rate=4, steps=2, headroom=0), step_seconds=30,
                           ready_timeout_s=300, retune_below_attainment=0.9)


class FakeCluster:
    """Candidates below 0.8 memory utilisation crash; goodput grows with max_num_seqs, ITL too."""

    def __init__(self) -> None:
        self.candidates: dict[str, dict] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.promoted: list[dict] = []
        self.load: tuple[str, float] | None = None

    def run(self, actions: list) -> None:
        for a in actions:
            if isinstance(a, DeployCandidate):
                assert a.revision not in self.candidates
                self.candidates[a.revision] = a.engine
                self.created.append(a.revision)
            elif isinstance(a, DeleteCandidate):
                self.candidates.pop(a.revision)
                self.deleted.append(a.revision)
            elif isinstance(a, RunLoad):
                self.load = (a.revision, a.request_rate)
            elif isinstance(a, Promote):
                self.promoted.append(a.engine)

    def observe(self, now: dt.datetime) -> Observation:
        if not self.candidates:
            return Observation(now=now)
        revision, engine = next(iter(self.candidates.items()))
        if engine["gpu_memory_utilization"] < 0.8:
            return Observation(now=now, candidate="failed", candidate_message="CrashLoopBackOff: CUDA out of memory")
        if self.load is None or self.load[0] != revision:
            return Observation(now=now, candidate="ready")
        rate = self.load[1]
        self.load = None
        seqs = engine["max_num_seqs"]
        itl = 0.01 + 0.0001 * min(seqs, rate * 10)
        tokens = min(rate, seqs / 4) * 100 * 30
        return Observation(now=now, candidate="ready", load_done=True, requests_ok=int(rate * 30),
                           window=WindowMetrics(seconds=30, output_tokens=tokens, ttft_p95_s=0.1, itl_p95_s=itl,
                                                source="prometheus"))


def drive(state: ClusterState, cluster: FakeCluster, reconciles: int, restart_every: int = 0) -> ClusterState:
    now = T0
    for i in range(reconciles):
        now += dt.timedelta(seconds=31)
        if restart_every and i % restart_every == 0:  # an operator restart: state only from the ConfigMap
            state = ClusterState.model_validate_json(state.model_dump_json())
        state, actions = advance(state, SETTINGS, cluster.observe(now))
        cluster.run(actions)
        if state.phase in ("Done", "Failed"):
            break
    return state


def new_state() -> ClusterState:
    space = gpu_space().with_overrides({"gpu_memory_utilization": {"min": 0.70, "max": 0.95}})
    return ClusterState(study=StudyState(space=space, seed=2))


@pytest.mark.parametrize("restart_every", [0, 3])
def test_trials_are_candidates_measured_removed_and_the_best_promoted(restart_every: int) -> None:
    cluster = FakeCluster()
    state = drive(new_state(), cluster, 200, restart_every)
    assert state.phase == "Done"
    runs = [r for r in state.study.records if r.ran]
    assert len(runs) == SETTINGS.max_trials
    assert cluster.created == cluster.deleted and not cluster.candidates  # every trial revision removed
    assert len(cluster.promoted) == 1 and cluster.promoted[0] == state.promoted
    best = max((r for r in runs if r.outcome.status == "ok"), key=lambda r: r.outcome.goodput_per_gpu)
    assert state.promoted == best.params
    crashed = [r for r in runs if r.params["gpu_memory_utilization"] < 0.8]
    assert crashed, "the seed should sample the crashing region at least once"
    for r in crashed:
        assert r.outcome.status == "infeasible" and "out of memory" in r.outcome.reason


def test_a_candidate_never_ready_is_infeasible_after_the_timeout() -> None:
    state, actions = advance(new_state(), SETTINGS, Observation(now=T0))
    assert state.phase == "Deploying" and isinstance(actions[0], DeployCandidate)
    state, actions = advance(state, SETTINGS, Observation(now=T0 + dt.timedelta(seconds=100), candidate="pending"))
    assert actions == [] and state.phase == "Deploying"
    state, actions = advance(state, SETTINGS, Observation(now=T0 + dt.timedelta(seconds=301), candidate="pending"))
    assert isinstance(actions[0], DeleteCandidate) and isinstance(actions[1], DeployCandidate)
    assert state.study.records[-1].outcome.status == "infeasible"
    assert "not ready within 300 s" in state.study.records[-1].outcome.reason


def test_retuning_starts_when_live_attainment_drops() -> None:
    state = drive(new_state(), FakeCluster(), 200)
    assert state.phase == "Done"
    same, actions = advance(state, SETTINGS, Observation(now=T0, live_attainment=0.95))
    assert same.phase == "Done" and actions == []
    again, actions = advance(state, SETTINGS, Observation(now=T0, live_attainment=0.5))
    assert again.phase == "Deploying" and isinstance(actions[0], DeployCandidate)
    assert "50.0%" in again.message
