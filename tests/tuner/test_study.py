"""The study: constrained TPE, infeasible configurations never run again, persistence through JSON."""

from __future__ import annotations

import math

import pytest
from kvpilot.tuner.objective import TrialOutcome
from kvpilot.tuner.space import Knob, SearchSpace
from kvpilot.tuner.study import StudyState, TunerStudy

SPACE = SearchSpace(target="cpu", knobs=(
    Knob(name="num_kv_blocks", kind="int", low=4, high=512, log=True),
    Knob(name="max_num_seqs", kind="int", low=1, high=64, log=True),
))


def fake(params: dict[str, float | int]) -> TrialOutcome:
    """A pool under 16 blocks crashes; otherwise goodput peaks at 16 sequences."""
    if params["num_kv_blocks"] < 16:
        return TrialOutcome(status="infeasible", reason="KV pool too small")
    seqs = params["max_num_seqs"]
    goodput = 100 * math.exp(-((math.log2(seqs) - 4) ** 2) / 4)
    return TrialOutcome(status="ok", goodput_per_gpu=goodput, goodput_tokens_per_s=goodput)


def drive(study: TunerStudy, trials: int) -> list[dict[str, float | int]]:
    ran = []
    while study.trials_run < trials:
        proposal = study.ask()
        assert proposal is not None
        ran.append(proposal.params)
        study.tell(proposal, fake(proposal.params), 0.1)
    return ran


def test_an_infeasible_configuration_is_never_run_again() -> None:
    study = TunerStudy(StudyState(space=SPACE, seed=0))
    bad = {"num_kv_blocks": 4, "max_num_seqs": 8}
    study.enqueue(bad)
    study.enqueue(bad)
    study.enqueue({"num_kv_blocks": 5, "max_num_seqs": 8})  # within the neighbourhood of the first
    ran = drive(study, 3)
    assert ran[0] == bad and ran.count(bad) == 1 and {"num_kv_blocks": 5, "max_num_seqs": 8} not in ran
    skipped = [r for r in study.records if not r.ran]
    assert len(skipped) == 2 and all(r.outcome.status == "infeasible" for r in skipped)
    assert "same configuration as trial 0" in skipped[0].note and "within" in skipped[1].note
    assert study.study.trials[1].constraints == {"slo": 10.0}  # told to the sampler as infeasible


def test_tpe_finds_the_peak_and_avoids_the_infeasible_region() -> None:
    study = TunerStudy(StudyState(space=SPACE, seed=3))
    ran = drive(study, 25)
    best = study.best()
    assert best is not None and best.outcome.goodput_per_gpu > 90
    late = ran[12:]
    assert sum(p["num_kv_blocks"] < 16 for p in late) <= 2


def test_a_study_continues_from_its_json() -> None:
    study = TunerStudy(StudyState(space=SPACE, seed=1))
    drive(study, 6)
    saved = study.state.model_dump_json()
    again = TunerStudy(StudyState.model_validate_json(saved))
    assert again.trials_run == 6 and len(again.study.trials) == len(study.records)
    assert again.best() == study.best()
    ran = drive(again, 9)
    assert len(ran) == 3
    assert all(p not in [r.params for r in study.records[:6] if r.ran] for p in ran)  # nothing re-run


def test_enqueue_rejects_configurations_outside_the_space() -> None:
    study = TunerStudy(StudyState(space=SPACE))
    with pytest.raises(ValueError, match="outside the search space: num_kv_blocks=2"):
        study.enqueue({"num_kv_blocks": 2, "max_num_seqs": 8})
    with pytest.raises(ValueError, match="unknown knobs"):
        study.enqueue({"gpu_memory_utilization": 0.9})
