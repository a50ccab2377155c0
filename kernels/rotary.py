"""Rotary embedding (neox / rotate-half, as HF Llama) applied to q and k in place, plus its cos/sin cache,
with Qwen3's per-head RMSNorm of q and k optionally fused in front.

The cache holds cos and sin of position * inv_freq, [max_positions, head_dim // 2] in fp32; llama3
frequency scaling is folded into inv_freq when the cache is built, so the kernel stays one formula.
Qwen3 normalises every q and k head before rotating it. Done apart, that is two norms over strided [T, H, D]
views (eight small PyTorch kernels each) and the rotation: in a 48-layer decode graph, some 800 launches a
step for a few hundred kilobytes. Fused, one launch reads each head once, normalises it exactly as
`rms_norm_ref` rounds (fp32 statistics, cast, times the weight, cast), rotates it and writes it back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpilot.kernels._common import check_dtype, check_same
from kvpilot.kernels.rms_norm import rms_norm_ref
from kvpilot.kernels.rope_cache import build_rope_cache, rope_inv_freq

__all__ = ["build_rope_cache", "rope_inv_freq", "rotary_embedding", "rotary_embedding_ref"]

HeadNorms = tuple[torch.Tensor, torch.Tensor, float]  # (q weight [D], k weight [D], eps)


@triton.jit
def _rotate_heads(x_ptr, row, stride_t, stride_h, h0, heads, cos, sin, w_ptr, eps,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr):  # fmt: skip
    dtype = x_ptr.dtype.element_ty
    offs_d = tl.arange(0, HALF)
    offs_h = h0 + tl.arange(0, BLOCK_H)
    mask = (offs_h < heads)[:, None]
    ptr = x_ptr + row * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + offs_d).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs_d).to(tl.float32)[None, :]
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cs,
    q_heads, k_heads, eps,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """Program (token, j): the j-th block of BLOCK_H heads, q's blocks first, then k's."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    pos = tl.load(pos_ptr + row).to(tl.int64)
    offs_d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_cs + offs_d)[None, :].to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cs + offs_d)[None, :].to(tl.float32)
    q_blocks = tl.cdiv(q_heads, BLOCK_H)
    if block < q_blocks:
        _rotate_heads(q_ptr, row, stride_q_t, stride_q_h, block * BLOCK_H, q_heads, cos, sin, qw_ptr, eps,
                      HALF, BLOCK_H, NORM)  # fmt: skip
    else:
        _rotate_heads(k_ptr, row, stride_k_t, stride_k_h, (block - q_blocks) * BLOCK_H, k_heads, cos, sin, kw_ptr,
                      eps, HALF, BLOCK_H, NORM)  # fmt: skip


def _check(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           norms: HeadNorms | None) -> None:  # fmt: skip
    check_dtype("q", q)
    check_same("q, k", q, k)
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be [T, H, D] with one T and D, got {tuple(q.shape)}, {tuple(k.shape)}")
    half = q.shape[2] // 2
    if q.shape[2] % 2 or half & (half - 1):
        raise ValueError(f"head_dim must be twice a power of two, got {q.shape[2]}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("q and k must be contiguous in head_dim")
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"positions must be int32/int64 [{q.shape[0]}], got {positions.dtype} {tuple(positions.shape)}"
        )
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != half or cos.stride() != sin.stride():
        raise ValueError(f"cos and sin must both be [P, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.stride(1) != 1:
        raise ValueError("cos and sin must be contiguous in their last dim")
    if norms is not None:
        for name, w in zip(("q", "k"), norms[:2], strict=True):
            if w.shape != (q.shape[2],) or w.stride(0) != 1 or w.device != q.device:
                raise ValueError(f"the {name} norm weight must be a contiguous [{q.shape[2]}] on q's device, "
                                 f"got {tuple(w.shape)} on {w.device}")  # fmt: skip


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    norms: HeadNorms | None = None,
) -> None:  # fmt: skip
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by the angles of positions [T] (rows of cos/sin);
    with `norms`, RMS-normalise every head by its weight first (Qwen3's q_norm and k_norm)."""
    _check(positions, q, k, cos, sin, norms)
    if q.shape[0] == 0:
        return
    half = q.shape[2] // 2
    block_h = min(8, triton.next_power_of_2(max(q.shape[1], k.shape[1])))
    grid = (q.shape[0], triton.cdiv(q.shape[1], block_h) + triton.cdiv(k.shape[1], block_h))
    q_w, k_w, eps = norms if norms is not None else (cos, cos, 0.0)  # unread without NORM
    _rotary_kernel[grid](
        positions, q, k, cos, sin, q_w, k_w,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        q.shape[1], k.shape[1], eps,
        HALF=half, BLOCK_H=block_h, NORM=norms is not None, num_warps=4,
    )  # fmt: skip


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    norms: HeadNorms | None = None,
) -> None:  # fmt: skip
    c = cos[positions.long()].float()[:, None, :]
    s = sin[positions.long()].float()[:, None, :]
    for i, x in enumerate((q, k)):
        if norms is not None:
            x.copy_(rms_norm_ref(x, norms[i], norms[2]))
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype))
