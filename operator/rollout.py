"""The blue-green state machine. Its whole state is `status` (active, rollout, retiring, failed revision).

`advance()` moves it one step using observations supplied by `Checks` and returns the rollout's `Part` of
status (reducer.py): the fields and conditions it owns, the phase it proposes and its Events. It never
writes to the cluster, nor to the status it was given.
The reconciler then makes the cluster match the new status (which revisions exist, what Services
select). Because every step is derived from status plus fresh observations, an operator restarted at
any point continues where the last one stopped.

    (none) --start--> Deploying --ready--> Verifying --smoke ok [+ SLO window ok]--> promoted
                         |                    |
                         +--timeout--+        +--smoke/SLO failed--+
                                     v                             v
                  autoRollback: candidate removed, failedRevision set; else step Failed (kept)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Protocol

from kvpilot.operator.engine_knobs import effective_knobs
from kvpilot.operator.reducer import OWNERS, Event, Part
from kvpilot.operator.spec import InferenceServiceSpec
from kvpilot.operator.status import (
    Condition,
    ConditionType,
    EngineConfigStatus,
    HistoryEntry,
    InferenceServiceStatus,
    Phase,
    RetiringRevision,
    RolloutState,
)
from kvpilot.operator.verify import CheckResult

SMOKE_ATTEMPTS = 3


class Checks(Protocol):
    def ready(self, revision: str) -> bool: ...
    def smoke(self) -> CheckResult: ...
    def slo_window(self, revision: str, seconds: float) -> CheckResult | None: ...


def engine_config(spec: InferenceServiceSpec) -> EngineConfigStatus:
    """Every knob as the revision runs it: the ones set in spec.engine, the engine's defaults for the rest."""
    return EngineConfigStatus(**effective_knobs(spec.engine))


@dataclasses.dataclass
class Machine:
    """`status` is the machine's working copy; `part` collects what it proposes."""

    status: InferenceServiceStatus
    spec: InferenceServiceSpec
    now: dt.datetime
    part: Part = dataclasses.field(default_factory=Part)

    def emit(self, kind: str, reason: str, message: str) -> None:
        self.part.events.append(Event(kind, reason, message))

    def set_phase(self, phase: Phase) -> None:
        self.part.phase = phase

    def condition(self, kind: ConditionType, value: bool | None, reason: str, message: str = "") -> None:
        self.part.condition(kind, value, reason, message)

    def previous_condition(self, kind: ConditionType) -> Condition | None:
        return self.status.condition(kind)

    def start(self, revision: str) -> None:
        if self.status.rollout is not None:
            old = self.status.rollout.revision
            self.history(old, "Superseded", "SpecChanged", f"replaced by revision {revision}")
            self.emit("Normal", "Superseded", f"rollout of {old} superseded by {revision}")
        self.status.rollout = RolloutState(revision=revision, step="Deploying", started_at=self.now)
        self.status.candidate_revision = revision
        self.condition("Progressing", True, "Deploying", f"deploying revision {revision}")
        self.emit("Normal", "RolloutStarted", f"deploying revision {revision}")

    def history(self, revision: str, result: str, reason: str, message: str = "") -> None:
        self.status.record(
            HistoryEntry(
                revision=revision,
                result=result,
                reason=reason,  # type: ignore[arg-type]
                message=message,
                at=self.now,
            )
        )

    def promote(self, revision: str) -> None:
        previous = self.status.active_revision
        if previous is not None and previous != revision:
            delete_after = self.now + dt.timedelta(seconds=self.spec.rollout.scale_down_delay_seconds)
            self.status.retiring = [
                *self.status.retiring,
                RetiringRevision(revision=previous, delete_after=delete_after),
            ]
        self.status.active_revision = revision
        self.status.candidate_revision = None
        self.status.rollout = None
        self.status.failed_revision = None
        self.status.engine_config = engine_config(self.spec)
        self.history(revision, "Promoted", "Verified" if previous else "FirstDeploy")
        self.condition("Progressing", False, "Promoted", f"revision {revision} serves")
        self.condition("Degraded", False, "Serving", "")
        self.emit("Normal", "Promoted", f"revision {revision} now serves" + (f" (was {previous})" if previous else ""))

    def fail(self, reason: str, message: str) -> None:
        rollout = self.status.rollout
        assert rollout is not None
        revision = rollout.revision
        self.condition("Progressing", False, reason, f"revision {revision}: {message}")
        if self.spec.rollout.auto_rollback:
            self.status.rollout = None
            self.status.candidate_revision = None
            self.status.failed_revision = revision
            self.history(revision, "RolledBack", reason, message)
            self.condition(
                "Degraded",
                True,
                f"RolledBack{reason}",
                f"revision {revision} rolled back, {self.status.active_revision} still serves: {message}",
            )
            self.emit("Warning", "RolledBack", f"revision {revision}: {reason}: {message}")
        else:
            rollout.step = "Failed"
            rollout.reason, rollout.message = reason, message
            self.history(revision, "Failed", reason, message)
            self.condition("Degraded", True, reason, f"revision {revision} kept for inspection: {message}")
            self.emit("Warning", "RolloutFailed", f"revision {revision}: {reason}: {message}")
        self.set_phase("Degraded")

    def elapsed(self, since: dt.datetime) -> float:
        return (self.now - since).total_seconds()


def _retire_expired(m: Machine) -> None:
    kept = [r for r in m.status.retiring if r.delete_after > m.now]
    for gone in m.status.retiring:
        if gone not in kept:
            m.emit("Normal", "Retired", f"revision {gone.revision} scaled down")
    m.status.retiring = kept


def _first_deploy(m: Machine, desired: str, checks: Checks) -> None:
    """Nothing serves yet, so there is nothing to protect: the first ready revision becomes active."""
    rollout = m.status.rollout
    if rollout is None or rollout.revision != desired:
        m.start(desired)
        rollout = m.status.rollout
    assert rollout is not None
    if checks.ready(desired):
        m.promote(desired)
        m.condition("Ready", True, "Serving", f"revision {desired} ready")
        m.set_phase("Ready")
    elif m.elapsed(rollout.started_at) > m.spec.rollout.ready_timeout_seconds:
        m.condition(
            "Ready",
            False,
            "ReadyTimeout",
            f"revision {desired} not ready after {m.spec.rollout.ready_timeout_seconds:.0f}s; still waiting",
        )
        m.set_phase("Failed")
    else:
        m.condition("Ready", False, "Deploying", f"waiting for revision {desired}")
        m.set_phase("Deploying")


def _steady(m: Machine, checks: Checks) -> None:
    active = m.status.active_revision
    assert active is not None
    if m.status.rollout is not None:  # the spec went back to what serves: drop the candidate
        old = m.status.rollout.revision
        m.history(old, "Superseded", "SpecReverted", f"spec matches the active revision {active} again")
        m.emit("Normal", "Superseded", f"rollout of {old} cancelled: spec matches active revision {active}")
        m.status.rollout = None
        m.status.candidate_revision = None
    m.status.failed_revision = None
    m.status.engine_config = engine_config(m.spec)
    progressing = m.previous_condition("Progressing")
    if progressing is None or progressing.status != "False":
        m.condition("Progressing", False, "UpToDate", f"revision {active} matches the spec")
    if checks.ready(active):
        m.condition("Ready", True, "Serving", f"revision {active} ready")
        m.condition("Degraded", False, "Serving", "")
        m.set_phase("Ready")
    else:
        m.condition("Ready", False, "ReplicasUnavailable", f"revision {active} has unavailable replicas")
        m.condition("Degraded", True, "ReplicasUnavailable", f"revision {active} has unavailable replicas")
        m.set_phase("Degraded")


def _upgrade(m: Machine, desired: str, checks: Checks, slo_checks: bool) -> None:
    if desired == m.status.failed_revision:
        m.set_phase("Degraded")  # stays rolled back until the spec changes again
        return
    if m.status.rollout is None or m.status.rollout.revision != desired:
        m.start(desired)
    rollout = m.status.rollout
    assert rollout is not None
    if rollout.step == "Failed":
        m.set_phase("Degraded")
        return
    m.set_phase("Upgrading")
    if rollout.step == "Deploying":
        if checks.ready(desired):
            rollout.step, rollout.verify_started_at = "Verifying", m.now
            m.condition("Progressing", True, "Verifying", f"revision {desired} ready; verifying")
            m.emit("Normal", "CandidateReady", f"revision {desired} ready; verifying through the preview Service")
        elif m.elapsed(rollout.started_at) > m.spec.rollout.ready_timeout_seconds:
            m.fail("ReadyTimeout", f"not ready within {m.spec.rollout.ready_timeout_seconds:.0f}s")
            return
        else:
            return
    _verify(m, desired, checks, slo_checks)


def _verify(m: Machine, desired: str, checks: Checks, slo_checks: bool) -> None:
    rollout = m.status.rollout
    assert rollout is not None and rollout.verify_started_at is not None
    if not rollout.smoke_passed:
        result = checks.smoke()
        rollout.smoke_attempts += 1
        if not result.ok:
            if rollout.smoke_attempts >= SMOKE_ATTEMPTS:
                m.fail(result.reason, result.message)
            return
        rollout.smoke_passed = True
        m.emit("Normal", "SmokeTestPassed", f"revision {desired}: {result.message}")
    window = m.spec.rollout.verify.slo_check_seconds
    if slo_checks and window > 0:
        if m.elapsed(rollout.verify_started_at) < window:
            return
        verdict = checks.slo_window(desired, window)
        if verdict is not None and not verdict.ok:
            m.fail(verdict.reason, verdict.message)
            return
    m.promote(desired)
    m.condition("Ready", True, "Serving", f"revision {desired} ready")
    m.set_phase("Ready")


def advance(
    status: InferenceServiceStatus,
    spec: InferenceServiceSpec,
    desired: str,
    checks: Checks,
    now: dt.datetime,
    slo_checks: bool,
) -> Part:
    """One step of the machine from `status` (left as it is): the rollout's part of the next status."""
    m = Machine(status=status.model_copy(deep=True), spec=spec, now=now)
    _retire_expired(m)
    if m.status.active_revision is None:
        _first_deploy(m, desired, checks)
    elif m.status.active_revision == desired:
        _steady(m, checks)
    else:
        _upgrade(m, desired, checks, slo_checks)
    owned = OWNERS["rollout"].fields - {"ready_replicas"}  # counted by the reconciler after converging
    m.part.fields.update({name: getattr(m.status, name) for name in owned})
    return m.part


def revisions_to_keep(status: InferenceServiceStatus) -> set[str]:
    """Revisions whose Deployments must exist after this step; every other one of ours goes."""
    keep = {r.revision for r in status.retiring}
    if status.active_revision:
        keep.add(status.active_revision)
    if status.rollout is not None:
        keep.add(status.rollout.revision)
    trial = status.tuning.current_trial if status.tuning is not None else None
    if trial is not None and trial.revision:  # a tuning trial is a revision too (issue 6)
        keep.add(trial.revision)
    return keep
