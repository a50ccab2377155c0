"""One status writer: each part of the operator proposes its share of status, the reducer derives the rest.

Rollout, tuning, the SLO reading, the routers and the autoscaler each return a `Part`: the status fields and
conditions it owns, the phase it would have the object in, and its Events. `reduce()` applies the parts to
the previous status once per pass, derives the phase from every proposal (the most urgent wins: a
trial in flight shows `Tuning` only while the rollout says `Ready`) and posts a `Phase…` Event only when
the stored phase really changes. It is pure: the reconciler writes its result.

A new part claims its fields and conditions in OWNERS; the reducer refuses a part that writes another's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kvpilot.operator.status import ConditionType, InferenceServiceStatus, Phase

# The most urgent phase first: what the user must know about wins over what is merely going on.
PHASE_PRECEDENCE: tuple[Phase, ...] = ("Failed", "Degraded", "Upgrading", "Deploying", "Tuning", "Ready", "Pending")
WARNING_PHASES = ("Degraded", "Failed")


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class ConditionProposal:
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""


@dataclasses.dataclass
class Part:
    phase: Phase | None = None
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    conditions: dict[ConditionType, ConditionProposal | None] = dataclasses.field(default_factory=dict)  # None drops
    events: list[Event] = dataclasses.field(default_factory=list)

    def condition(self, kind: ConditionType, status: bool | None, reason: str, message: str = "") -> None:
        self.conditions[kind] = ConditionProposal(status, reason, message)


@dataclasses.dataclass(frozen=True)
class Owner:
    fields: frozenset[str]
    conditions: frozenset[str]


OWNERS: dict[str, Owner] = {
    "spec": Owner(frozenset(), frozenset({"Ready"})),  # an invalid spec: Ready=False InvalidSpec, nothing else
    "rollout": Owner(
        frozenset({"active_revision", "candidate_revision", "failed_revision", "engine_config", "rollout", "retiring",
                   "history", "ready_replicas"}),
        frozenset({"Ready", "Progressing", "Degraded"}),
    ),
    "tuning": Owner(frozenset({"tuning"}), frozenset({"Tuned"})),
    "slo": Owner(frozenset({"slo", "ttft_p95_ms", "tokens_per_second"}), frozenset({"SLOMet"})),
    "router": Owner(frozenset({"router"}), frozenset({"RouterReady"})),
    "autoscaling": Owner(frozenset({"autoscaling"}), frozenset()),
}


def _check(source: str, part: Part) -> None:
    owner = OWNERS[source]
    foreign = (set(part.fields) - owner.fields) | (set(part.conditions) - owner.conditions)
    if foreign:
        raise ValueError(f"status part {source!r} writes {sorted(foreign)}, which it does not own")


def apply(previous: InferenceServiceStatus, parts: Mapping[str, Part], generation: int | None
          ) -> InferenceServiceStatus:
    """The status the parts describe; the phase is the most urgent proposed (else the previous one)."""
    status = previous.model_copy(deep=True)
    for source, part in parts.items():
        _check(source, part)
        for name, value in part.fields.items():
            setattr(status, name, value)
        for kind, proposal in part.conditions.items():
            if proposal is None:
                status.conditions = [c for c in status.conditions if c.type != kind]
            else:
                status.set_condition(kind, proposal.status, proposal.reason, proposal.message, generation)
    proposed = [p.phase for p in parts.values() if p.phase is not None]
    status.phase = min(proposed, key=PHASE_PRECEDENCE.index) if proposed else previous.phase
    status.observed_generation = generation
    return status


def reduce(previous: InferenceServiceStatus, parts: Mapping[str, Part], generation: int | None
           ) -> tuple[InferenceServiceStatus, list[Event]]:
    """The pass's status and its Events: each part's, and one `Phase…` Event if the phase really changed."""
    status = apply(previous, parts, generation)
    events = [e for part in parts.values() for e in part.events]
    if status.phase != previous.phase:
        kind = "Warning" if status.phase in WARNING_PHASES else "Normal"
        events.append(Event(kind, f"Phase{status.phase}", f"phase {previous.phase} -> {status.phase}"))
    return status, events
