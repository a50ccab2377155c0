"""The blue-green state machine on its own: fake observations, a controllable clock."""

from __future__ import annotations

import dataclasses
import datetime as dt

from kvpilot.operator import rollout
from kvpilot.operator.reducer import Event, reduce
from kvpilot.operator.rollout import revisions_to_keep
from kvpilot.operator.spec import parse_spec
from kvpilot.operator.status import InferenceServiceStatus
from kvpilot.operator.verify import CheckResult

from .conftest import BASE_SPEC

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@dataclasses.dataclass
class FakeChecks:
    ready_revisions: set[str] = dataclasses.field(default_factory=set)
    smoke_ok: bool = True
    slo_verdict: CheckResult | None = None
    smoke_calls: int = 0

    def ready(self, revision: str) -> bool:
        return revision in self.ready_revisions

    def smoke(self) -> CheckResult:
        self.smoke_calls += 1
        return CheckResult(
            ok=self.smoke_ok, reason="SmokeTestPassed" if self.smoke_ok else "SmokeTestFailed", message=""
        )

    def slo_window(self, revision: str, seconds: float) -> CheckResult | None:
        return self.slo_verdict


def advance(status: InferenceServiceStatus, spec, desired: str, checks: FakeChecks, now: dt.datetime,
            generation: int, slo_checks: bool) -> list[Event]:
    """One pass as the reconciler makes it: the rollout's part through the reducer, written back to `status`."""
    new, events = reduce(status, {"rollout": rollout.advance(status, spec, desired, checks, now, slo_checks)},
                         generation)
    for name in type(status).model_fields:
        setattr(status, name, getattr(new, name))
    return events


def serving(status: InferenceServiceStatus, checks: FakeChecks, **spec_overrides):
    spec = parse_spec({**BASE_SPEC, **spec_overrides})
    checks.ready_revisions.add("A")
    advance(status, spec, "A", checks, T0, 1, slo_checks=False)
    return spec


def test_first_deploy_then_upgrade_with_slo_window():
    status, checks = InferenceServiceStatus(), FakeChecks()
    spec = serving(status, checks, rollout={**BASE_SPEC["rollout"], "verify": {"sloCheckSeconds": 60}})
    assert status.active_revision == "A" and status.phase == "Ready"

    advance(status, spec, "B", checks, T0, 2, slo_checks=True)
    assert status.phase == "Upgrading" and status.rollout.step == "Deploying"
    checks.ready_revisions.add("B")
    advance(status, spec, "B", checks, T0 + dt.timedelta(seconds=1), 2, slo_checks=True)
    assert status.rollout.step == "Verifying" and status.rollout.smoke_passed
    advance(status, spec, "B", checks, T0 + dt.timedelta(seconds=30), 2, slo_checks=True)
    assert status.active_revision == "A"  # the SLO window is not over yet
    events = advance(status, spec, "B", checks, T0 + dt.timedelta(seconds=62), 2, slo_checks=True)
    assert status.active_revision == "B" and "Promoted" in [e.reason for e in events]
    assert checks.smoke_calls == 1
    assert revisions_to_keep(status) == {"A", "B"}  # A waits out scaleDownDelaySeconds
    advance(status, spec, "B", checks, T0 + dt.timedelta(seconds=70), 2, slo_checks=True)
    assert revisions_to_keep(status) == {"B"}


def test_slo_violation_rolls_back():
    status, checks = InferenceServiceStatus(), FakeChecks()
    spec = serving(status, checks, rollout={**BASE_SPEC["rollout"], "verify": {"sloCheckSeconds": 10}})
    checks.ready_revisions.add("B")
    checks.slo_verdict = CheckResult(ok=False, reason="SLOViolated", message="TTFT p95 900 ms > 500 ms")
    advance(status, spec, "B", checks, T0, 2, slo_checks=True)
    advance(status, spec, "B", checks, T0 + dt.timedelta(seconds=11), 2, slo_checks=True)
    assert status.active_revision == "A" and status.failed_revision == "B"
    assert status.condition("Progressing").reason == "SLOViolated"
    assert "900 ms" in status.condition("Degraded").message
    assert status.history[-1].result == "RolledBack"


def test_without_auto_rollback_the_failed_candidate_is_kept():
    status, checks = InferenceServiceStatus(), FakeChecks()
    spec = serving(status, checks, rollout={**BASE_SPEC["rollout"], "autoRollback": False})
    advance(status, spec, "B", checks, T0, 2, slo_checks=False)
    advance(status, spec, "B", checks, T0 + dt.timedelta(seconds=10), 2, slo_checks=False)
    assert status.rollout.step == "Failed" and status.rollout.reason == "ReadyTimeout"
    assert revisions_to_keep(status) == {"A", "B"} and status.phase == "Degraded"


def test_new_spec_supersedes_a_rollout_and_reverting_cancels_it():
    status, checks = InferenceServiceStatus(), FakeChecks()
    spec = serving(status, checks)
    advance(status, spec, "B", checks, T0, 2, slo_checks=False)
    advance(status, spec, "C", checks, T0, 3, slo_checks=False)
    assert status.candidate_revision == "C" and status.history[-1].result == "Superseded"
    advance(status, spec, "A", checks, T0, 4, slo_checks=False)
    assert status.rollout is None and revisions_to_keep(status) == {"A"} and status.phase == "Ready"


def test_first_deploy_timeout_keeps_waiting_and_says_so():
    status, checks = InferenceServiceStatus(), FakeChecks()
    spec = parse_spec(BASE_SPEC)
    advance(status, spec, "A", checks, T0, 1, slo_checks=False)
    advance(status, spec, "A", checks, T0 + dt.timedelta(seconds=10), 1, slo_checks=False)
    assert status.phase == "Failed" and status.condition("Ready").reason == "ReadyTimeout"
    assert revisions_to_keep(status) == {"A"}
    checks.ready_revisions.add("A")
    advance(status, spec, "A", checks, T0 + dt.timedelta(seconds=20), 1, slo_checks=False)
    assert status.phase == "Ready"


def test_the_machine_leaves_its_input_alone_and_phase_events_mark_real_transitions():
    status, checks = InferenceServiceStatus(), FakeChecks()
    spec = parse_spec(BASE_SPEC)
    before = status.model_copy(deep=True)
    part = rollout.advance(status, spec, "A", checks, T0, slo_checks=False)
    assert status == before and part.phase == "Deploying"
    reasons = [e.reason for e in advance(status, spec, "A", checks, T0, 1, slo_checks=False)]
    assert reasons.count("PhaseDeploying") == 1
    assert "PhaseDeploying" not in [e.reason for e in advance(status, spec, "A", checks, T0, 1, slo_checks=False)]
