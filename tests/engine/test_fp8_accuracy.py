"""What FP8 costs, teacher-forced over 16 prompts x 32 tokens against the unquantized model (CPU, float32).

Bounds are the measured figures of the tiny random models (bench/README.md, "FP8 accuracy") with a margin;
tiny random models have near-flat logits, so top-1 agreement is far lower than on a trained model. The planted
tests prove the bounds are tight enough to catch scales that are wrong.
"""

from __future__ import annotations

import pytest
import torch
from kvpilot.engine import LLM
from kvpilot.engine.quant.accuracy import Accuracy, AccuracyBounds, measure, prompts
from kvpilot.engine.quant.fp8_linear import Fp8Linear

VOCAB = 512
# Measured (worst family): weights max |dlogit| 2.87, mean KL 0.054, max KL 0.50, top-1 0.67;
# KV cache 1.96, 0.016, 0.18, 0.81.
BOUNDS = {
    "weights": AccuracyBounds(max_abs_logit_err=4.5, mean_kl=0.09, max_kl=0.8, min_top1_agreement=0.55),
    "kv_cache": AccuracyBounds(max_abs_logit_err=3.0, mean_kl=0.03, max_kl=0.3, min_top1_agreement=0.7),
}
MODES = {"weights": {"quantization": "fp8"}, "kv_cache": {"kv_cache_dtype": "fp8"}}


@pytest.fixture(scope="module")
def reference(tiny_model):
    cache: dict[str, LLM] = {}

    def get(family: str) -> LLM:
        if family not in cache:
            cache[family] = LLM(str(tiny_model(family)))
        return cache[family]

    return get


def _measure(reference: LLM, candidate: LLM) -> Accuracy:
    return measure(reference, candidate, prompts(VOCAB, count=16), tokens=32)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fp8_stays_within_its_bounds(tiny_model, reference, family: str, mode: str) -> None:
    got = _measure(reference(family), LLM(str(tiny_model(family)), **MODES[mode]))
    assert got.positions == 16 * 32
    assert not BOUNDS[mode].violations(got), (family, mode, got)


def test_bounds_catch_wrong_weight_scales(tiny_model, reference) -> None:
    candidate = LLM(str(tiny_model("llama")), quantization="fp8")
    for module in candidate.core.runner.model.modules():
        if isinstance(module, Fp8Linear):
            module.weight_scale.mul_(1.25)
    assert BOUNDS["weights"].violations(_measure(reference("llama"), candidate))


def test_bounds_catch_wrong_kv_scales(tiny_model, reference) -> None:
    """Scales 1/32 of the calibrated ones saturate e4m3 on the larger keys and values."""
    candidate = LLM(str(tiny_model("llama")), kv_cache_dtype="fp8")
    for layer in candidate.core.runner.model.model.layers:
        layer.self_attn.k_scale.div_(32)
        layer.self_attn.v_scale.div_(32)
    got = _measure(reference("llama"), candidate)
    assert BOUNDS["kv_cache"].violations(got), got
    assert torch.isfinite(torch.tensor(got.max_abs_logit_err)), "saturation, not NaN"
