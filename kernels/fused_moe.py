"""Fused mixture-of-experts: route each token to its top-k experts, sort the (token, slot) pairs into
expert-aligned blocks, then two grouped GEMMs over the experts' stacked weights.

1. `route`: softmax over the router logits in fp32, top-k, optional renormalisation of the k weights
   (`route_fused`, moe_route.py, on the GPU: one launch).
2. `align_block_size` (moe_align.py): pairs sorted by expert, each expert's run padded to a multiple of
   BLOCK_SIZE_M with a sentinel, so every program's BLOCK_SIZE_M rows share one expert's weights. Every shape
   is bounded by the token count alone and nothing reads a device value on the host, so the whole forward can
   be captured in a CUDA graph: programs past the padded total (a device scalar) exit at once.
3. `_gate_up_kernel`: hidden[token] @ w13[e].T for the gate and up halves together, SiLU(gate) * up in fp32,
   one row per pair of the [T*k, I] intermediate.
4. `_down_kernel`: intermediate[pair] @ w2[e].T times the pair's routing weight, one row per pair of
   [T*k, H]; the k rows of a token are summed after, in fp32, by one small kernel (moe_sum.py).

Weights are laid out as transformers 5 keeps them: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I].
A few tokens (`uses_gemv`) take moe_gemv.py instead: one matrix-vector product per routed pair, no sort.

`fused_experts_ref` (fused_moe_ref.py, free of Triton so CPU installs need none) is the same function in plain
PyTorch, one expert at a time, in the order Hugging Face adds them: the CPU path and what the kernels are
tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpilot.kernels._common import check_dtype, check_same, dot_upcast, mma
from kvpilot.kernels.fused_moe_config import MoEConfig, get_config, uses_gemv
from kvpilot.kernels.fused_moe_ref import fused_experts_ref, route
from kvpilot.kernels.moe_align import align_block_size, max_padded_pairs
from kvpilot.kernels.moe_gemv import experts_gemv
from kvpilot.kernels.moe_route import route_fused
from kvpilot.kernels.moe_sum import sum_top_k

__all__ = ["align_block_size", "fused_experts", "fused_experts_ref", "max_padded_pairs", "route", "route_fused"]


@triton.jit
def _block_coords(num_rows, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program, grouped along rows so neighbours reuse weight tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group, (pid % per_group) // group


@triton.jit
def _block_rows(
    sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n, num_pairs, N, stride_we, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The block's pairs (pads masked), its columns, and the offsets of its expert's first [K, N] weight tile."""
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_offs = expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    return pair, pair < num_pairs, offs_n, offs_n < N, offs_k, w_offs


# Token counts change every step: specialising on them would compile a variant per batch size under load.
@triton.jit(do_not_specialize=["num_rows", "num_pairs"])
def _gate_up_kernel(
    x_ptr, w_ptr, out_ptr, sorted_ids_ptr, expert_ids_ptr, total_ptr,
    num_rows, num_pairs, N, K,
    stride_x, stride_we, stride_wn, stride_o,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _block_coords(num_rows, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    pair, m_mask, offs_n, n_mask, offs_k, w_offs = _block_rows(
        sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n, num_pairs, N, stride_we, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K
    )
    token = (pair // TOP_K).to(tl.int64)
    x_ptrs = x_ptr + token[:, None] * stride_x + offs_k[None, :]
    gate_ptrs = w_ptr + w_offs
    up_ptrs = gate_ptrs + N * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        acc_gate += mma(x, tl.load(gate_ptrs, mask=w_mask, other=0.0), PRECISION, UPCAST)
        acc_up += mma(x, tl.load(up_ptrs, mask=w_mask, other=0.0), PRECISION, UPCAST)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    o_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_o + offs_n[None, :]
    tl.store(o_ptrs, act.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["num_rows", "num_pairs"])
def _down_kernel(
    a_ptr, w_ptr, out_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, total_ptr,
    num_rows, num_pairs, N, K,
    stride_a, stride_we, stride_wn, stride_o,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _block_coords(num_rows, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    pair, m_mask, offs_n, n_mask, offs_k, w_offs = _block_rows(
        sorted_ids_ptr, expert_ids_ptr, pid_m, pid_n, num_pairs, N, stride_we, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K
    )
    rows = pair.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_a + offs_k[None, :]
    w_ptrs = w_ptr + w_offs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc += mma(a, tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0), PRECISION, UPCAST)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc *= tl.load(weights_ptr + rows, mask=m_mask, other=0.0)[:, None]
    o_ptrs = out_ptr + rows[:, None] * stride_o + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> None:
    check_dtype("x", x)
    check_same("x, w13, w2", x, w13, w2)
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"x must be [T, H], w13 [E, 2I, H], w2 [E, H, I]; got {x.shape}, {w13.shape}, {w2.shape}")
    e, two_i, h = w13.shape
    if h != x.shape[1] or two_i % 2 or w2.shape != (e, h, two_i // 2):
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x {tuple(x.shape)}")
    if weights.shape != ids.shape or weights.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk weights {tuple(weights.shape)} and ids {tuple(ids.shape)} must both be [T, k]")
    if x.stride(1) != 1 or w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("x, w13 and w2 must be contiguous in their last dimension")


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) for x [T, H] -> [T, H], in x's dtype.

    A given config forces the sorted path (the tune times it); without one a few tokens go pair by pair."""
    _check(x, w13, w2, topk_weights, topk_ids)
    tokens, top_k = topk_ids.shape
    experts, two_i, hidden = w13.shape
    inter = two_i // 2
    if tokens == 0:
        return torch.zeros_like(x)
    if config is None and uses_gemv(tokens, top_k, experts):
        return experts_gemv(x, w13, w2, topk_weights, topk_ids)
    cfg = config or get_config(tokens, experts, inter, x.dtype, x.device)
    bm, bn, bk = cfg.BLOCK_SIZE_M, cfg.BLOCK_SIZE_N, cfg.BLOCK_SIZE_K
    sorted_ids, expert_ids, total = align_block_size(topk_ids, bm, experts)
    num_rows, pairs = sorted_ids.shape[0], tokens * top_k
    precision, upcast = "ieee" if x.dtype == torch.float32 else "tf32", dot_upcast(x.dtype)
    act = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    _gate_up_kernel[(triton.cdiv(num_rows, bm) * triton.cdiv(inter, bn),)](
        x, w13, act, sorted_ids, expert_ids, total,
        num_rows, pairs, inter, hidden,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.GROUP_SIZE_M,
        PRECISION=precision, UPCAST=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    out = torch.empty((pairs, hidden), dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).float().contiguous()
    _down_kernel[(triton.cdiv(num_rows, bm) * triton.cdiv(hidden, bn),)](
        act, w2, out, weights, sorted_ids, expert_ids, total,
        num_rows, pairs, hidden, inter,
        act.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.GROUP_SIZE_M,
        PRECISION=precision, UPCAST=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return sum_top_k(out, top_k, x.dtype)
