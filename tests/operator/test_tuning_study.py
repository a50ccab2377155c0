"""The operator's side of the study: spec -> tuner settings and space, and the study -> status.tuning."""

from __future__ import annotations

from kvpilot.operator.spec import parse_spec
from kvpilot.operator.tuning_study import settings_from_spec, space_from_spec, tuning_status
from kvpilot.tuner.cluster import Observation, advance

from tests.tuner.test_cluster import SETTINGS, T0, FakeCluster, drive, new_state


def test_settings_and_space_come_from_the_inference_service_spec() -> None:
    spec = parse_spec({
        "model": {"name": "m", "uri": "demo"}, "resources": {"gpusPerReplica": 4}, "replicas": 3,
        "slo": {"ttftP95Ms": 300, "itlP95Ms": 40, "minThroughputTokensPerSecond": 6000},
        "tuning": {"enabled": True, "maxTrials": 12, "trialDurationSeconds": 90,
                   "searchSpace": {"maxNumSeqs": {"min": 16, "max": 256}, "gpuMemoryUtilization": {"fixed": 0.9}}},
    })
    s = settings_from_spec(spec)
    assert (s.max_trials, s.gpus, s.slo.ttft_p95_ms, s.step_seconds) == (12, 4, 300, 30)
    assert s.slo.min_throughput_tokens_per_second == 2000  # the service's floor, shared by its 3 replicas
    space = space_from_spec(spec)
    assert space.knob("tensor_parallel_size").choices == (1, 2, 4)
    assert (space.knob("max_num_seqs").low, space.knob("max_num_seqs").high) == (16, 256)
    assert space.knob("gpu_memory_utilization").pinned_value() == 0.9


def test_tuning_status_fits_the_operators_status_model() -> None:
    engine = {"gpuMemoryUtilization": 0.9, "maxNumSeqs": 256, "maxNumBatchedTokens": 8192, "tensorParallelSize": 1,
              "enablePrefixCaching": True}
    state = drive(new_state(), FakeCluster(), 200)
    status = tuning_status(state, engine, "llm-tuning")
    assert status.state == "Done" and status.trials_run == SETTINGS.max_trials
    assert status.best is not None and status.best.feasible and status.best.goodput_tokens_per_second
    assert status.best.config.max_num_seqs == state.promoted["max_num_seqs"]
    running, _ = advance(new_state(), SETTINGS, Observation(now=T0))
    live = tuning_status(running, engine, "llm-tuning")
    assert live.state == "Running" and live.current_trial is not None and live.current_trial.revision == "trial-0"
