"""Acceptance: `kvpilot tune` on the demo model with a real Prometheus, from a shell.

At least 4 trials run; a configuration made infeasible on purpose (a KV pool of 2 blocks, 32 tokens,
for prompts of 32-64 tokens) is marked infeasible and not run again when suggested a second time; the
best configuration meets the SLO when a fresh server is measured again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kvpilot.engine.config import EngineConfig
from kvpilot.engine.flags import engine_values
from kvpilot.engine.server import cli as serve_cli
from kvpilot.tuner.local import LocalRunner, LocalSettings
from kvpilot.tuner.objective import SLO
from kvpilot.tuner.prometheus import free_port, local_prometheus
from kvpilot.tuner.report import load_state
from kvpilot.tuner.study import TunerStudy

SLO_ARGS = ["--slo-ttft-p95-ms", "500", "--slo-itl-p95-ms", "120"]
BAD = {"num_kv_blocks": 2, "max_num_seqs": 8, "max_num_batched_tokens": 256}


pytestmark = pytest.mark.slow  # a real `kvpilot tune`: four engine servers, a Prometheus, a minute or more


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if shutil.which("prometheus") is None:
        pytest.skip("no `prometheus` binary (.ci/run installs Debian's): cannot test against a real one")
    out = tmp_path_factory.mktemp("tune")
    cmd = [sys.executable, "-m", "kvpilot", "tune", "--model", "demo", *SLO_ARGS, "--trials", "4",
           "--output", str(out), "--enqueue", json.dumps(BAD), "--enqueue", json.dumps(BAD)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_tune_runs_four_trials_reports_progress_and_writes_everything(tuned: tuple[Path, str]) -> None:
    out, stdout = tuned
    assert "metrics from a local Prometheus" in stdout
    assert "num_kv_blocks" in stdout and "gpu_memory_utilization has no effect" in stdout
    for i in range(1, 5):
        assert f"[{i}/4] trial" in stdout
    for name in ("best_config.json", "trials.json", "trials.csv", "history.png", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    state = load_state(out / "trials.json")
    assert sum(r.ran for r in state.records) == 4
    best = json.loads((out / "best_config.json").read_text())
    assert best["goodput_tokens_per_s"] > 0 and best["ttft_p95_ms"] <= 500 and best["itl_p95_ms"] <= 120
    assert best["metrics_source"].startswith("prometheus http://127.0.0.1:")
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    served = EngineConfig(**engine_values(parser.parse_args(best["serve_flags"])))
    assert served.model == "demo" and served.max_model_len == 96
    assert served.model_dump(include=set(best["engine"])) == best["engine"]


def test_the_infeasible_configuration_is_marked_and_not_retried(tuned: tuple[Path, str]) -> None:
    out, _ = tuned
    records = load_state(out / "trials.json").records
    bad = [r for r in records if {k: r.params[k] for k in BAD} == BAD]
    assert [r.ran for r in bad] == [True, False]
    assert all(r.outcome.status == "infeasible" for r in bad)
    assert bad[0].outcome.reason and "same configuration" in bad[1].note


def test_the_best_configuration_meets_the_slo_when_measured_again(tuned: tuple[Path, str]) -> None:
    out, _ = tuned
    study = TunerStudy(load_state(out / "trials.json"))
    best = study.best()
    assert best is not None
    written = json.loads((out / "best_config.json").read_text())
    assert written["engine"] == best.params
    port = free_port()
    slo = SLO.model_validate(written["slo"])
    settings = LocalSettings(model="demo", slo=slo, engine_port=port, workdir=out / "logs", **written["measured_with"])
    with local_prometheus(f"127.0.0.1:{port}") as url:
        m = LocalRunner(settings, study, url).verify(best)
    assert m.source.startswith("prometheus") and m.request_rate == written["request_rate"]
    assert m.requests_failed == 0 and m.meets(slo), m
