"""The few-token path of the fused MoE: one program per (routed pair, tile of output units), no block sort.

At decode sizes (a few tokens, each routed to k of many experts) nearly every pair has an expert of its own,
so the sorted path's padding of each expert's run to a 16-row tile and its sort buy nothing: the step is one
matrix-vector product per pair, bound by reading that expert's weights. Here each program reads its pair's
token (or intermediate) row and a [BLOCK_N, K] slab of its expert's weights, and reduces in fp32 on the CUDA
cores; nothing is padded, sorted or specialised on the token count, so every decode batch size shares one
compiled kernel per tile and the whole path sits inside a captured graph.

1. `_gate_up_gemv`: gate and up rows of w13[e] against x[token], SiLU(gate) * up, into act [T*k, I].
2. `_down_gemv`: act[pair] against w2[e], times the pair's routing weight, into fp32 [T*k, H]; the k rows of
   a token are summed after, in fp32, as the sorted path does (moe_sum.py).

`uses_gemv` (fused_moe_config.py) says when the path applies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpilot.kernels.fused_moe_config import GemvConfig, gemv_configs
from kvpilot.kernels.moe_sum import sum_top_k


@triton.jit
def _pair_tile(ids_ptr, w_ptr, N, stride_we, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's pair, its output units (and their mask), and its expert's first [BLOCK_N, BLOCK_K] tile."""
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    return pair, offs_n, offs_n < N, offs_k, w_ptrs


@triton.jit
def _row_chunk(row_ptr, k0, offs_k, n_mask, K, EVEN_K: tl.constexpr):
    """Inputs k0 .. k0 + BLOCK_K of one row in fp32, and the mask of the weight tile they meet."""
    if EVEN_K:
        row = tl.load(row_ptr + k0 + offs_k).to(tl.float32)
        w_mask = n_mask[:, None]
    else:
        k_mask = offs_k < K - k0
        row = tl.load(row_ptr + k0 + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w_mask = n_mask[:, None] & k_mask[None, :]
    return row, w_mask


@triton.jit
def _gate_up_gemv(
    x_ptr, w_ptr, out_ptr, ids_ptr, N, K, stride_x, stride_we, stride_wn, stride_o,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pair, offs_n, n_mask, offs_k, gate_ptrs = _pair_tile(ids_ptr, w_ptr, N, stride_we, stride_wn, BLOCK_N, BLOCK_K)
    x_row = x_ptr + (pair // TOP_K) * stride_x
    up_ptrs = gate_ptrs + N * stride_wn
    acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, w_mask = _row_chunk(x_row, k0, offs_k, n_mask, K, EVEN_K)
        acc_gate += tl.load(gate_ptrs + k0, mask=w_mask, other=0.0).to(tl.float32) * x[None, :]
        acc_up += tl.load(up_ptrs + k0, mask=w_mask, other=0.0).to(tl.float32) * x[None, :]
    gate = tl.sum(acc_gate, 1)
    act = gate * tl.sigmoid(gate) * tl.sum(acc_up, 1)
    tl.store(out_ptr + pair * stride_o + offs_n, act.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _down_gemv(
    a_ptr, w_ptr, out_ptr, ids_ptr, weights_ptr, N, K, stride_a, stride_we, stride_wn, stride_o,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pair, offs_n, n_mask, offs_k, w_ptrs = _pair_tile(ids_ptr, w_ptr, N, stride_we, stride_wn, BLOCK_N, BLOCK_K)
    a_row = a_ptr + pair * stride_a
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a, w_mask = _row_chunk(a_row, k0, offs_k, n_mask, K, EVEN_K)
        acc += tl.load(w_ptrs + k0, mask=w_mask, other=0.0).to(tl.float32) * a[None, :]
    out = tl.sum(acc, 1) * tl.load(weights_ptr + pair)
    tl.store(out_ptr + pair * stride_o + offs_n, out, mask=n_mask)


def experts_gemv(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    tiles: dict[str, GemvConfig] | None = None,
) -> torch.Tensor:
    """fused_experts' function for a few tokens (inputs checked by fused_experts): x [T, H] -> [T, H]."""
    tokens, top_k = topk_ids.shape
    experts, two_i, hidden = w13.shape
    inter = two_i // 2
    tiles = tiles or gemv_configs(experts, inter, x.dtype, x.device)
    gu, dn = tiles["gate_up"], tiles["down"]
    pairs = tokens * top_k
    ids = topk_ids.reshape(-1)
    act = torch.empty((pairs, inter), dtype=x.dtype, device=x.device)
    _gate_up_gemv[(pairs, triton.cdiv(inter, gu.BLOCK_N))](
        x, w13, act, ids, inter, hidden, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_N=gu.BLOCK_N, BLOCK_K=gu.BLOCK_K, EVEN_K=hidden % gu.BLOCK_K == 0,
        num_warps=gu.num_warps,
    )  # fmt: skip
    out = torch.empty((pairs, hidden), dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1)
    if weights.dtype != torch.float32:
        weights = weights.float()
    _down_gemv[(pairs, triton.cdiv(hidden, dn.BLOCK_N))](
        act, w2, out, ids, weights, hidden, inter, act.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_N=dn.BLOCK_N, BLOCK_K=dn.BLOCK_K, EVEN_K=inter % dn.BLOCK_K == 0, num_warps=dn.num_warps,
    )  # fmt: skip
    return sum_top_k(out, top_k, x.dtype)
