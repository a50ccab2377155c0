"""Norms, rotary embedding and SiLU-and-mul against their PyTorch references."""

from __future__ import annotations

import pytest
import torch
from kvpilot.kernels.activation import silu_and_mul, silu_and_mul_ref
from kvpilot.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from kvpilot.kernels.rotary import build_rope_cache, rope_inv_freq, rotary_embedding, rotary_embedding_ref
from transformers import LlamaConfig
from transformers.modeling_rope_utils import _compute_llama3_parameters

from .helpers import DTYPES, TOL, rel_err

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm(dtype: torch.dtype, hidden: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, hidden, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    assert rel_err(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 96, generator=gen).to(dtype)
    res = torch.randn(4, 96, generator=gen).to(dtype)
    w = torch.randn(96, generator=gen).to(dtype)
    out, new_res = fused_add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_res = fused_add_rms_norm_ref(x, res, w, 1e-6)
    assert rel_err(new_res, ref_res) <= TOL[dtype]  # the interpreter truncates fp32->bf16; GPUs round
    assert rel_err(out, ref_out) <= TOL[dtype]


def test_rms_norm_rejects_bad_weight() -> None:
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [32, 300])
def test_silu_and_mul(dtype: torch.dtype, inter: int) -> None:
    x = torch.randn(3, 2 * inter, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert rel_err(silu_and_mul(x), silu_and_mul_ref(x)) <= TOL[dtype]


def test_silu_and_mul_single_token_and_odd_width() -> None:
    x = torch.randn(1, 16)
    assert rel_err(silu_and_mul(x), silu_and_mul_ref(x)) <= 1e-6
    with pytest.raises(ValueError, match="2\\*I"):
        silu_and_mul(torch.randn(2, 7))


def test_llama3_inv_freq_matches_transformers() -> None:
    cfg = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": 500000.0, **LLAMA3},
    )
    hf_inv_freq, attention_factor = _compute_llama3_parameters(cfg, "cpu")
    assert attention_factor == 1.0
    assert torch.equal(rope_inv_freq(128, 500000.0, LLAMA3), hf_inv_freq)


def test_rope_cache_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="yarn"):
        build_rope_cache(64, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_gqa(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    cos, sin = build_rope_cache(32, 300, 500000.0, LLAMA3)
    qkv = torch.randn(6, (4 + 2 + 2) * 32, generator=gen).to(dtype)
    q = qkv[:, : 4 * 32].view(6, 4, 32)  # strided views, as the model slices its fused qkv projection
    k = qkv[:, 4 * 32 : 6 * 32].view(6, 2, 32)
    positions = torch.tensor([0, 1, 17, 255, 256, 299])
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, 6 * 32 :].clone()
    rotary_embedding(positions, q, k, cos, sin)
    rotary_embedding_ref(positions, q_ref, k_ref, cos, sin)
    assert rel_err(q, q_ref) <= TOL[dtype]
    assert rel_err(k, k_ref) <= TOL[dtype]
    assert torch.equal(qkv[:, 6 * 32 :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_with_fused_head_norms(dtype: torch.dtype) -> None:
    """Qwen3's q_norm/k_norm fused in front of the rotation: each head normalised, rounded as the unfused
    layers round, rotated; v untouched; head counts that do not fill a block of heads."""
    gen = torch.Generator().manual_seed(5)
    cos, sin = build_rope_cache(32, 300, 1000000.0)
    qkv = (3 * torch.randn(5, (6 + 3 + 3) * 32, generator=gen)).to(dtype)
    q, k = qkv[:, : 6 * 32].view(5, 6, 32), qkv[:, 6 * 32 : 9 * 32].view(5, 3, 32)
    norms = ((1 + 0.2 * torch.randn(32, generator=gen)).to(dtype), torch.randn(32, generator=gen).to(dtype), 1e-6)
    positions = torch.tensor([0, 3, 64, 200, 299], dtype=torch.int32)
    q_ref, k_ref, v_before = q.clone(), k.clone(), qkv[:, 9 * 32 :].clone()
    rotary_embedding(positions, q, k, cos, sin, norms)
    rotary_embedding_ref(positions, q_ref, k_ref, cos, sin, norms)
    assert rel_err(q, q_ref) <= TOL[dtype]
    assert rel_err(k, k_ref) <= TOL[dtype]
    assert torch.equal(qkv[:, 9 * 32 :], v_before)


def test_rotary_head_norm_reference_is_hf_qwen3() -> None:
    """The fused norm's reference is transformers' Qwen3 q_norm applied head by head, then the rotation."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    cos, sin = build_rope_cache(16, 40, 10000.0)
    positions = torch.tensor([1, 30])
    q, k = torch.randn(2, 4, 16), torch.randn(2, 2, 16)
    hf_q_norm, hf_k_norm = Qwen3RMSNorm(16, eps=1e-6), Qwen3RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        hf_q_norm.weight.normal_()
        hf_k_norm.weight.normal_()
    want_q, want_k = hf_q_norm(q).detach(), hf_k_norm(k).detach()
    rotary_embedding_ref(positions, want_q, want_k, cos, sin)
    rotary_embedding(positions, q, k, cos, sin, (hf_q_norm.weight.detach(), hf_k_norm.weight.detach(), 1e-6))
    assert rel_err(q, want_q) <= 1e-6
    assert rel_err(k, want_k) <= 1e-6


def test_rotary_rejects_bad_norm_weight() -> None:
    cos, sin = build_rope_cache(16, 8, 10000.0)
    q, k = torch.randn(1, 2, 16), torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="k norm weight"):
        rotary_embedding(torch.tensor([0]), q, k, cos, sin, (torch.ones(16), torch.ones(8), 1e-6))


def test_rotary_matches_hf_rotate_half() -> None:
    """The reference itself agrees with HF's apply_rotary_pos_emb on fp32 inputs."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = build_rope_cache(16, 40, 10000.0)
    positions = torch.tensor([3, 39])
    q, k = torch.randn(2, 3, 16), torch.randn(2, 1, 16)
    hf_cos = torch.cat((cos, cos), -1)[positions][None]
    hf_sin = torch.cat((sin, sin), -1)[positions][None]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    rotary_embedding(positions, q, k, cos, sin)
    assert rel_err(q, hf_q[0].transpose(0, 1)) <= 1e-6
    assert rel_err(k, hf_k[0].transpose(0, 1)) <= 1e-6
