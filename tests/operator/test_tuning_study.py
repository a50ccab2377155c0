"""The operator's side of the study: spec -> tuner settings and space, and the study -> status.tuning."""

from __future__ import annotations

from kvpilot.operator.spec import parse_spec
from kvpilot.operator.tuning_study import settings_from_spec, space_from_spec, study_basis, tuning_status, with_params
from kvpilot.tuner.cluster import ClusterState, Observation, advance
from kvpilot.tuner.study import StudyState

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


def test_precision_is_a_knob_only_with_allow_quantization_and_shows_in_status() -> None:
    base = {"model": {"name": "m", "uri": "demo"}, "tuning": {"enabled": True}}
    assert "quantization" not in {k.name for k in space_from_spec(parse_spec(base)).knobs}
    allowed = parse_spec({**base, "tuning": {"enabled": True, "allowQuantization": True}})
    space = space_from_spec(allowed)
    assert space.knob("quantization").searched and space.knob("kv_cache_dtype").searched
    assert study_basis(allowed) != study_basis(parse_spec(base)), "allowing precision is a different study"
    state = ClusterState(study=StudyState(space=space.with_overrides(
        {"gpu_memory_utilization": {"min": 0.70, "max": 0.95}}), seed=2))
    state = drive(state, FakeCluster(), 200, restart_every=3)  # restarts: None and strings survive the ConfigMap
    assert state.phase == "Done" and state.promoted is not None
    tried = {(r.params["quantization"], r.params["kv_cache_dtype"]) for r in state.study.records if r.ran}
    assert len(tried) > 1, tried
    status = tuning_status(state, {"maxNumSeqs": 256, "kvCacheDtype": "auto"}, "m-tuning")
    assert status.best is not None
    assert status.best.config.quantization == state.promoted["quantization"]
    assert status.best.config.kv_cache_dtype == state.promoted["kv_cache_dtype"]
    weights = state.promoted["quantization"] or "checkpoint"
    kv = "model-dtype" if state.promoted["kv_cache_dtype"] == "auto" else "fp8"
    assert status.best.precision == f"{weights} weights, {kv} KV cache"
    assert with_params(allowed, {"quantization": "fp8"}).engine.quantization == "fp8"
