"""Outputs of a study (files and plots) and the CLI's handling of bad input, without a server."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from kvpilot.tuner.objective import SLO, TrialOutcome
from kvpilot.tuner.report import _pareto, load_state, write_report
from kvpilot.tuner.space import cpu_space
from kvpilot.tuner.study import StudyState, TunerStudy

from kvpilot.cli import main


def test_report_writes_best_config_trials_and_plots(tmp_path: Path) -> None:
    study = TunerStudy(StudyState(space=cpu_space(96), seed=0))
    outcomes = [
        TrialOutcome(status="ok", goodput_per_gpu=300, goodput_tokens_per_s=300, request_rate=8, ttft_p95_s=0.05,
                     itl_p95_s=0.02),
        TrialOutcome(status="infeasible", reason="the server exited with code 1\nlong log"),
        TrialOutcome(status="ok", goodput_per_gpu=420, goodput_tokens_per_s=420, request_rate=16, ttft_p95_s=0.2,
                     itl_p95_s=0.03),
        TrialOutcome(status="slo_unmet", violation=0.4, reason="no offered rate met the SLO"),
    ]
    for o in outcomes:
        proposal = study.ask()
        assert proposal is not None
        study.tell(proposal, o, 1.0)
    best = write_report(study, tmp_path, "demo", SLO(ttft_p95_ms=300, itl_p95_ms=50), ["--model", "demo"])
    assert best is not None and best.goodput_per_gpu == 420 and best.ttft_p95_ms == 200 and best.trial == 2
    assert json.loads((tmp_path / "best_config.json").read_text())["engine"] == study.records[2].params
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "infeasible", "ok", "slo_unmet"]
    assert rows[1]["reason"] == "the server exited with code 1"
    assert load_state(tmp_path / "trials.json") == study.state
    for png in ("history.png", "importance.png", "pareto.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG", png


def test_pareto_front_keeps_points_no_other_beats_on_both_axes() -> None:
    pts = [(10.0, 100.0, 0), (20.0, 90.0, 1), (30.0, 200.0, 2), (5.0, 50.0, 3)]
    assert [p[2] for p in _pareto(pts)] == [3, 0, 2]


@pytest.mark.parametrize(("extra", "message"), [
    (["--search", "max_num_seqs"], "expected KNOB=MIN:MAX"),
    (["--search", "no_such_knob=1:2"], "cannot override 'no_such_knob'"),
    (["--enqueue", '{"max_num_seqs": 100000}'], "outside the search space"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--prometheus-url", "http://127.0.0.1:9"], "--prometheus-url needs --engine-port"),
])
def test_cli_rejects_bad_input_with_a_clear_error(tmp_path: Path, extra: list[str], message: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    argv = ["tune", "--model", "demo", "--slo-ttft-p95-ms", "100", "--slo-itl-p95-ms", "50", "--target", "cpu",
            "--output", str(tmp_path), *extra]
    assert main(argv) == 2
    assert message in caplog.text
