"""FP8 weights: every checkpoint format loads to the dequantized reference, dynamic and dummy FP8, tensor
parallelism over gloo, and the errors that name what is wrong."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from kvpilot.engine import LLM, SamplingParams
from kvpilot.engine.quant.accuracy import measure, prompts
from kvpilot.engine.quant.fp8_linear import Fp8Linear, resolve_gemm
from kvpilot.engine.quant.fp8_scheme import fp8_scheme
from kvpilot.engine.quant.kv_scales import fp8_support_error
from kvpilot.kernels.fp8_math import FP8_DTYPE, dequantize_groups
from safetensors.torch import load_file, save_file

from .fp8_checkpoints import FORMATS, write_dequantized, write_fp8_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 60))]


def _dequantized_layer(layer: Fp8Linear) -> torch.Tensor:
    return dequantize_groups(layer.weight, layer.weight_scale, layer.group_k, torch.float32)


def _projections(llm: LLM, layer: int = 0) -> dict[str, Fp8Linear]:
    block = llm.core.runner.model.model.layers[layer]
    return {"qkv": block.self_attn.qkv_proj, "o": block.self_attn.o_proj, "gate_up": block.mlp.gate_up_proj,
            "down": block.mlp.down_proj}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fp8_checkpoint_matches_its_dequantized_reference(tiny_model, tmp_path: Path, fmt: str) -> None:
    src = tiny_model("qwen2")
    deq = write_fp8_checkpoint(src, tmp_path / "fp8", fmt)
    llm = LLM(str(tmp_path / "fp8"))
    layers = _projections(llm)
    assert all(isinstance(m, Fp8Linear) and m.weight.dtype == FP8_DTYPE for m in layers.values())
    p = "model.layers.0."
    expect = {
        "qkv": torch.cat([deq[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
        "o": deq[p + "self_attn.o_proj.weight"],
        "gate_up": torch.cat([deq[p + "mlp.gate_proj.weight"], deq[p + "mlp.up_proj.weight"]]),
        "down": deq[p + "mlp.down_proj.weight"],
    }
    for name, layer in layers.items():  # e4m3 x fp32 scale is one fp32 rounding, the same on both sides
        torch.testing.assert_close(_dequantized_layer(layer), expect[name], rtol=1e-7, atol=0, msg=name)
    assert llm.core.runner.model.lm_head.weight.dtype == torch.float32, "the LM head stays in the model dtype"
    # Whole model: only the per-token activation rounding separates it from the dequantized float model.
    write_dequantized(src, tmp_path / "deq", deq)
    acc = measure(LLM(str(tmp_path / "deq")), llm, prompts(512, count=4), tokens=8)
    assert acc.mean_kl < 0.05 and acc.top1_agreement > 0.6, acc


def test_checkpoint_kv_scales_reach_the_fp8_cache(tiny_model, tmp_path: Path) -> None:
    write_fp8_checkpoint(tiny_model("qwen2"), tmp_path / "m", "ct-channel", kv_scales=True)
    llm = LLM(str(tmp_path / "m"), kv_cache_dtype="fp8")
    attn = llm.core.runner.model.model.layers[1].self_attn
    assert torch.equal(attn.k_scale, torch.full((2,), 0.05)) and torch.equal(attn.v_scale, torch.full((2,), 0.02))
    assert llm.core.runner.kv_scale_source == "checkpoint" and llm.core.runner.k_cache.dtype == FP8_DTYPE
    assert all(len(o.outputs[0].token_ids) == 6 for o in llm.generate(PROMPTS, GREEDY))


def test_dynamic_fp8_of_a_16_bit_checkpoint(tiny_model) -> None:
    """quantization="fp8": per-output-channel weight scales; embeddings, norms and LM head untouched."""
    llm = LLM(str(tiny_model("llama")), quantization="fp8")
    runner = llm.core.runner
    qkv = _projections(llm)["qkv"]
    assert qkv.weight_scale.shape == (qkv.out_features, 1) and qkv.gemm == "reference"
    assert runner.model.model.embed_tokens.weight.dtype == torch.float32
    assert runner.model.model.norm.weight.dtype == torch.float32
    assert all(len(o.outputs[0].token_ids) == 6 for o in llm.generate(PROMPTS, GREEDY))


def test_dummy_fp8_weights_have_the_real_shapes(tiny_model, tmp_path: Path) -> None:
    shutil.copy(tiny_model("qwen3") / "config.json", tmp_path / "config.json")
    llm = LLM(str(tmp_path), load_format="dummy", quantization="fp8")
    layers = _projections(llm)
    assert layers["qkv"].weight.shape == (4 * 32 + 2 * 2 * 32, 64) and layers["down"].weight.shape == (64, 128)
    assert all(m.weight.dtype == FP8_DTYPE for m in layers.values())
    assert all(len(o.outputs[0].token_ids) == 6 for o in llm.generate(PROMPTS, GREEDY))


@pytest.mark.parametrize("fmt", ["fp8-block", "dynamic"])
def test_two_ranks_shard_weights_and_scales_alike(tiny_model, tmp_path: Path, fmt: str) -> None:
    """Rank 0 holds exactly its slice of TP=1's e4m3 weights and scales; outputs agree. Block scales split on
    group boundaries, so activations quantize identically and logprobs match tightly; per-channel activation
    scales are per rank's half of K for the row-split projections (as in vLLM), so those only agree closely.
    The dynamic case also runs an e4m3 KV cache: each rank calibrates its own heads."""
    src = tiny_model("qwen2")
    if fmt == "dynamic":
        model, kw = str(src), {"quantization": "fp8", "kv_cache_dtype": "fp8"}
    else:
        write_fp8_checkpoint(src, tmp_path / "m", fmt)
        model, kw = str(tmp_path / "m"), {}
    single = LLM(model, **kw)
    sharded = LLM(model, tensor_parallel_size=2, **kw)
    try:
        one, two = _projections(single), _projections(sharded)
        for name, cut in (("qkv", None), ("gate_up", None), ("o", 1), ("down", 1)):
            a, b = one[name], two[name]
            if cut is None:  # row split: q, k, v (gate, up) halves each
                parts = [64, 32, 32] if name == "qkv" else [128, 128]
                w = torch.cat([p[: p.shape[0] // 2] for p in a.weight.float().split(parts)])
                s = torch.cat([p[: p.shape[0] // 2] for p in a.weight_scale.split(parts)])
            else:
                w = a.weight.float()[:, : a.in_features // 2]
                g = a.weight_scale.shape[1]
                s = a.weight_scale if g == 1 else a.weight_scale[:, : g // 2]
            assert torch.equal(b.weight.float(), w) and torch.equal(b.weight_scale, s), name
        if kw.get("kv_cache_dtype"):  # layer 0's K/V come straight from the embeddings: the same on both
            attn_one = single.core.runner.model.model.layers[0].self_attn
            attn_two = sharded.core.runner.model.model.layers[0].self_attn
            torch.testing.assert_close(attn_two.k_scale, attn_one.k_scale[:1])
            torch.testing.assert_close(attn_two.v_scale, attn_one.v_scale[:1])
        ref, got = single.generate(PROMPTS, GREEDY), sharded.generate(PROMPTS, GREEDY)
    finally:
        sharded.core.close()
    tol = 1e-4 if fmt == "fp8-block" else 0.1
    for a, b in zip(ref, got, strict=True):
        if fmt == "fp8-block":
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
        first = a.outputs[0].logprobs[0].logprob, b.outputs[0].logprobs[0].logprob
        assert abs(first[0] - first[1]) < tol


def _config(**qc: object) -> dict:
    return {"quantization_config": qc}


def test_errors_name_the_field(tiny_model, tmp_path: Path) -> None:
    from kvpilot.engine.models.arch import load_arch

    arch = load_arch(tiny_model("llama"))
    with pytest.raises(ValueError, match="quant_method 'awq' is not supported"):
        fp8_scheme(None, _config(quant_method="awq"), arch)
    with pytest.raises(ValueError, match="weight_block_size"):
        fp8_scheme(None, _config(quant_method="fp8", weight_block_size=[128]), arch)
    with pytest.raises(ValueError, match="format 'pack-quantized'"):
        fp8_scheme(None, _config(quant_method="compressed-tensors", format="pack-quantized"), arch)
    with pytest.raises(ValueError, match=re.escape("ignores 'model.layers.0.mlp.down_proj'")):
        fp8_scheme(None, _config(quant_method="fp8", ignored_layers=["model.layers.0.mlp.down_proj"]), arch)
    moe = load_arch(tiny_model("qwen2_moe"))  # its experts have no FP8 path: refused, never a half-quantized model
    with pytest.raises(ValueError, match="FP8 weights cover dense models only; 'qwen2_moe'"):
        fp8_scheme("fp8", {"model_type": "qwen2_moe"}, moe)
    assert fp8_scheme(None, {"model_type": "qwen2_moe"}, moe) is None
    error = fp8_support_error(["quantization='fp8'"], (8, 0), "NVIDIA A100")
    assert error is not None and "quantization='fp8'" in error and "8.0" in error and "8.9" in error
    assert fp8_support_error(["kv_cache_dtype='fp8'"], (9, 0), "NVIDIA H200") is None
    with pytest.raises(ValueError, match="fp8_gemm_backend 'scaled_mm' needs CUDA"):
        resolve_gemm("scaled_mm", torch.device("cpu"), grouped=False)
    # Through the engine: an unknown method in config.json, and a checkpoint that lost a scale.
    src = tiny_model("qwen2")
    write_fp8_checkpoint(src, tmp_path / "m", "fp8-block")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        LLM(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape("lacks model.layers.1.mlp.up_proj.weight_scale_inv")):
        LLM(str(tmp_path / "m"))


def test_fp8_pool_holds_twice_the_tokens_of_a_16_bit_one(tiny_model) -> None:
    model, budget = str(tiny_model("llama")), 4 * 2**20
    half = LLM(model, dtype="bfloat16", kv_cache_memory_bytes=budget).core.runner
    fp8 = LLM(model, dtype="bfloat16", kv_cache_dtype="fp8", kv_cache_memory_bytes=budget).core.runner
    assert fp8.k_cache.dtype == FP8_DTYPE and fp8.kv_scale_source == "calibrated"
    assert fp8.num_blocks == 2 * half.num_blocks
    assert fp8.k_cache.nbytes == half.k_cache.nbytes
    assert "2x the tokens per byte of a bfloat16 pool" in fp8.kv_description
