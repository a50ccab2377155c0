"""The status reducer: parts propose, the phase is derived once per pass, a Phase Event only on a real change."""

from __future__ import annotations

import pytest
from kvpilot.operator.reducer import Part, reduce
from kvpilot.operator.status import InferenceServiceStatus


def test_a_trial_in_flight_shows_tuning_while_the_rollout_says_ready_and_each_change_is_one_event():
    ready = Part(phase="Ready")
    ready.condition("Ready", True, "Serving")
    status, events = reduce(InferenceServiceStatus(phase="Deploying"), {"rollout": ready}, 1)
    assert status.phase == "Ready" and [e.reason for e in events] == ["PhaseReady"]
    passes = []
    for _ in range(5):  # a study's passes: the rollout keeps proposing Ready, tuning Tuning
        status, events = reduce(status, {"rollout": ready, "tuning": Part(phase="Tuning")}, 1)
        passes.append([e.reason for e in events])
    assert status.phase == "Tuning" and passes == [["PhaseTuning"], [], [], [], []]
    status, events = reduce(status, {"rollout": ready, "tuning": Part()}, 1)  # the study is done
    assert status.phase == "Ready" and [e.reason for e in events] == ["PhaseReady"]
    upgrading = reduce(status, {"rollout": Part(phase="Upgrading"), "tuning": Part(phase="Tuning")}, 2)[0]
    assert upgrading.phase == "Upgrading"  # a rollout in flight is what the user must see


def test_parts_write_only_what_they_own_and_none_drops_a_condition():
    status = reduce(InferenceServiceStatus(), {"tuning": Part(fields={"tuning": None})}, 1)[0]
    tuned = Part()
    tuned.condition("Tuned", False, "Waiting")
    status = reduce(status, {"tuning": tuned}, 1)[0]
    assert status.condition("Tuned") is not None
    assert reduce(status, {"tuning": Part(conditions={"Tuned": None})}, 1)[0].condition("Tuned") is None
    with pytest.raises(ValueError, match="does not own"):
        reduce(status, {"tuning": Part(fields={"active_revision": "x"})}, 1)
    with pytest.raises(ValueError, match="does not own"):
        reduce(status, {"slo": tuned}, 1)
