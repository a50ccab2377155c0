"""Rotary embedding (neox / rotate-half, as HF Llama) applied to q and k in place, plus its cos/sin cache.

The cache holds cos and sin of position * inv_freq, [max_positions, head_dim // 2] in fp32; llama3
frequency scaling is folded into inv_freq when the cache is built, so the kernel stays one formula.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpilot.kernels._common import check_dtype, check_same
from kvpilot.kernels.rope_cache import build_rope_cache, rope_inv_freq

__all__ = ["build_rope_cache", "rope_inv_freq", "rotary_embedding", "rotary_embedding_ref"]


@triton.jit
def _rotate_heads(x_ptr, row, stride_t, stride_h, heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_d = tl.arange(0, HALF)
    for h0 in range(0, heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h < heads)[:, None]
        ptr = x_ptr + row * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_cs,
    q_heads,
    k_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + row).to(tl.int64)
    offs_d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_cs + offs_d)[None, :].to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cs + offs_d)[None, :].to(tl.float32)
    _rotate_heads(q_ptr, row, stride_q_t, stride_q_h, q_heads, cos, sin, HALF, BLOCK_H)
    _rotate_heads(k_ptr, row, stride_k_t, stride_k_h, k_heads, cos, sin, HALF, BLOCK_H)


def _check(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
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


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place by the angles of positions [T] (rows of cos/sin)."""
    _check(positions, q, k, cos, sin)
    if q.shape[0] == 0:
        return
    half = q.shape[2] // 2
    block_h = min(16, triton.next_power_of_2(max(q.shape[1], k.shape[1])))
    _rotary_kernel[(q.shape[0],)](
        positions, q, k, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        q.shape[1], k.shape[1],
        HALF=half, BLOCK_H=block_h, num_warps=4,
    )  # fmt: skip


def rotary_embedding_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    c = cos[positions.long()].float()[:, None, :]
    s = sin[positions.long()].float()[:, None, :]
    for x in (q, k):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype))
