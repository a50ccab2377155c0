"""The search space: issue 6's bounds, overrides from spec.tuning, canonical configurations, flags."""

from __future__ import annotations

import optuna
import pytest
from kvpilot.tuner.space import Bounds, Knob, cpu_space, divisors, engine_flags, gpu_space


def test_gpu_defaults_are_issue_6s() -> None:
    space = gpu_space(8)
    gmu, seqs, tokens, tp = (space.knob(n) for n in ("gpu_memory_utilization", "max_num_seqs",
                                                       "max_num_batched_tokens", "tensor_parallel_size"))
    assert (gmu.low, gmu.high, gmu.log) == (0.70, 0.95, False)
    assert (seqs.low, seqs.high, seqs.log) == (8, 1024, True)
    assert (tokens.low, tokens.high, tokens.log) == (256, 32768, True)
    assert tp.choices == (1, 2, 4, 8)
    assert divisors(6) == (1, 2, 3, 6)
    with pytest.raises(ValueError, match="at least 1"):
        divisors(0)


def test_cpu_space_tunes_kv_blocks_not_gpu_memory() -> None:
    space = cpu_space(96)
    names = [k.name for k in space.knobs]
    assert "num_kv_blocks" in names and "gpu_memory_utilization" not in names
    assert "gpu_memory_utilization has no effect" in space.note
    assert not space.knob("tensor_parallel_size").searched


def test_overrides_narrow_and_pin_and_reject_unknown() -> None:
    space = gpu_space(4).with_overrides({
        "max_num_seqs": {"min": 16, "max": 64},
        "gpu_memory_utilization": Bounds(fixed=0.9),
        "tensor_parallel_size": {"max": 2},
        "max_num_batched_tokens": None,
    })
    assert (space.knob("max_num_seqs").low, space.knob("max_num_seqs").high) == (16, 64)
    assert space.knob("gpu_memory_utilization").pinned_value() == 0.9
    assert space.knob("tensor_parallel_size").choices == (1, 2)
    with pytest.raises(ValueError, match="cannot override 'num_kv_blocks'"):
        gpu_space().with_overrides({"num_kv_blocks": {"min": 1}})
    with pytest.raises(ValueError, match="not among"):
        gpu_space(4).with_overrides({"tensor_parallel_size": {"fixed": 3}})
    with pytest.raises(ValueError, match="low <= high"):
        gpu_space().with_overrides({"max_num_seqs": {"min": 64, "max": 8}})
    with pytest.raises(ValueError, match="log-scale"):
        Knob(name="max_num_seqs", kind="int", low=0, high=4, log=True)


def test_suggest_stays_in_bounds_and_pins() -> None:
    space = gpu_space(2).with_overrides({"gpu_memory_utilization": {"fixed": 0.8}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        params = space.canonical(space.suggest(study.ask()))
        assert params["gpu_memory_utilization"] == 0.8
        assert 8 <= params["max_num_seqs"] <= 1024 and isinstance(params["max_num_seqs"], int)
        assert 256 <= params["max_num_batched_tokens"] <= 32768
        assert params["tensor_parallel_size"] in (1, 2)


def test_distance_is_in_unit_coordinates() -> None:
    space = gpu_space()
    a = {"gpu_memory_utilization": 0.70, "max_num_seqs": 8, "max_num_batched_tokens": 256, "tensor_parallel_size": 1}
    b = {**a, "max_num_seqs": 1024}
    assert space.distance(a, a) == 0.0
    assert space.distance(a, b) == pytest.approx(1.0)
    assert space.distance(a, {**a, "max_num_seqs": 16}) == pytest.approx(1 / 7)  # log2: 3 -> 4 of 3..10


def test_canonical_requires_every_knob_and_flags_use_vllm_spelling() -> None:
    with pytest.raises(ValueError, match="lacks 'max_num_seqs'"):
        cpu_space(64).canonical({"num_kv_blocks": 8})
    assert engine_flags({"max_num_seqs": 8, "gpu_memory_utilization": 0.9}) == [
        "--max-num-seqs=8", "--gpu-memory-utilization=0.9"]
    with pytest.raises(ValueError, match="not an EngineConfig field"):
        Knob(name="max_num_seq", kind="int", low=1, high=8)


def test_precision_is_searched_only_when_allowed() -> None:
    """Issue 14: quantization and kv_cache_dtype are category knobs, off unless allowQuantization."""
    assert {"quantization", "kv_cache_dtype"}.isdisjoint(k.name for k in gpu_space(2).knobs)
    space = gpu_space(2, allow_quantization=True)
    quant, kv = space.knob("quantization"), space.knob("kv_cache_dtype")
    assert quant.searched and quant.categories == (None, "fp8") and kv.categories == ("auto", "fp8")
    assert quant.pinned_value() is None and kv.contains("fp8") and not kv.contains("fp16")
    assert space.distance({**_any(space), "quantization": None}, {**_any(space), "quantization": "fp8"}) == 1.0
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {(p["quantization"], p["kv_cache_dtype"]) for p in
            (space.canonical(space.suggest(study.ask())) for _ in range(40))}
    assert seen == {(None, "auto"), (None, "fp8"), ("fp8", "auto"), ("fp8", "fp8")}
    assert engine_flags({"quantization": "fp8", "kv_cache_dtype": "fp8"}) == ["--quantization=fp8",
                                                                              "--kv-cache-dtype=fp8"]
    assert engine_flags({"quantization": None}) == []
    assert "quantization" in {k.name for k in cpu_space(96, allow_quantization=True).knobs}
    with pytest.raises(ValueError, match="no bounds to override"):
        space.with_overrides({"quantization": {"fixed": 1}})
    with pytest.raises(ValueError, match="'int8' is not a value EngineConfig accepts"):
        Knob(name="quantization", kind="category", categories=(None, "int8"))


def _any(space) -> dict:
    return {k.name: k.pinned_value() for k in space.knobs}
