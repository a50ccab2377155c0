"""Paged decode attention: one query token per sequence over its paged KV context, GQA-aware and split-K.

One program handles every query head that shares a KV head (so each K/V row is read once per step) and one
contiguous split of the context; a second kernel merges the splits by their log-sum-exp. Splitting the
context keeps the GPU full when batch x KV heads alone is too few programs for long contexts. With a sliding
window of w the context is the last w keys only: the splits divide that span, and no block before it is read
(the KV manager may have given those back). An e4m3 cache is read as e4m3 (half the bytes) and converted in
registers; its per-head scales fold into the softmax scale (K) and the output (V), so dequantizing costs no
extra multiply per element.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from kvpilot.kernels._common import check_kv_scales, check_paged_inputs, dot_upcast, mma
from kvpilot.kernels.fp8_math import dequantize_heads, is_fp8

_LOG2E = 1.4426950408889634


# The block-table width changes with every batch: specialising on it would compile variants under load.
@triton.jit(do_not_specialize=["stride_bt", "window"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    k_scale_ptr,
    v_scale_ptr,
    qk_scale,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    stride_bt,
    window,
    NUM_SPLITS: tl.constexpr,
    SLIDING: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    FP8: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kvh)
    seq_len = tl.load(seq_lens_ptr + b)
    lo = 0
    if SLIDING:
        lo = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :],
        mask=g_mask[:, None],
        other=0.0,
    )
    k_base = k_cache_ptr + kvh * stride_kc_h
    v_base = v_cache_ptr + kvh * stride_vc_h
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        in_page = offs_n % PAGE
        k = tl.load(
            k_base + page[:, None] * stride_kc_b + in_page[:, None] * stride_kc_s + offs_d[None, :],
            mask=n_mask[:, None],
            other=0.0,
        )
        v = tl.load(
            v_base + page[:, None] * stride_vc_b + in_page[:, None] * stride_vc_s + offs_d[None, :],
            mask=n_mask[:, None],
            other=0.0,
        )
        if FP8:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = mma(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if FP8:
        out = out * tl.load(v_scale_ptr + kvh)
    if NUM_SPLITS == 1:
        o_ptr = out_ptr + b.to(tl.int64) * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :]
        tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        num_heads = tl.num_programs(1) * GROUP
        row = (b.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_mask[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_o_t,
    stride_o_h,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = (b.to(tl.int64) * tl.num_programs(1) + h) * NUM_SPLITS
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_mask & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    parts = tl.load(
        part_out_ptr + (row + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0
    )
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b.to(tl.int64) * stride_o_t + h * stride_o_h + offs_d, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Enough splits for ~2 programs per SM (B64 x 8 KV heads on an H100 needs none), never under 256 tokens."""
    want = math.ceil(2 * _sm_count(device) / max(1, batch * kv_heads))
    cap = max(1, max_seq_len // 256)
    return max(1, min(want, cap, 64))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    window: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] (sequence i's one query is row i) -> [B, Hq, D]; sequence i sees seq_lens[i] cached keys,
    or only the last `window` of them.

    num_splits fixes the split-K factor (keep it fixed under CUDA graphs); by default it follows the batch and
    max_seq_len (a host int: pass it to avoid reading the block-table width as the bound). An e4m3 cache needs
    kv_scales (k_scale, v_scale), each [Hkv] float32.
    """
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, kv_scales)
    batch, hq, d = q.shape
    if batch != block_tables.shape[0]:
        raise ValueError(
            f"decode takes one query per sequence: q has {batch} rows for {block_tables.shape[0]} sequences"
        )
    hkv, page = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    if num_splits is None:
        bound = max_seq_len if max_seq_len is not None else block_tables.shape[1] * page
        bound = min(bound, window) if window else bound
        num_splits = default_num_splits(batch, hkv, bound, q.device)
    group = hq // hkv
    if num_splits > 1:
        part_out = torch.empty((batch, hq, num_splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, hq, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out
    fp8 = is_fp8(k_cache.dtype)
    k_scale, v_scale = kv_scales if fp8 and kv_scales is not None else (seq_lens, seq_lens)
    _decode_split_kernel[(batch, hkv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse, k_scale, v_scale,
        scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), window or 0,
        NUM_SPLITS=num_splits, SLIDING=bool(window), GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, PAGE=page, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=dot_upcast(q.dtype), FP8=fp8,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _decode_reduce_kernel[(batch, hq)](
            part_out, part_lse, out, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=d, num_warps=4,
        )  # fmt: skip
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hkv
    out = torch.empty_like(q)
    for i, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(max(0, n - window) if window else 0, n, device=q.device)
        slots = block_tables[i, pos // page].long() * page + pos % page
        k, v = read_kv(k_cache, v_cache, slots, kv_scales)
        k = k.repeat_interleave(group, dim=1)  # [n, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), k) * scale, dim=-1)
        out[i] = torch.einsum("hn,nhd->hd", probs, v).to(q.dtype)
    return out


def read_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The references' read of K/V rows [n, Hkv, D] at flat slots, in float32, dequantized when e4m3."""
    k, v = k_cache.flatten(0, 1)[slots], v_cache.flatten(0, 1)[slots]
    if not is_fp8(k_cache.dtype):
        return k.float(), v.float()
    check_kv_scales(k_cache, kv_scales)
    assert kv_scales is not None
    return dequantize_heads(k, kv_scales[0], torch.float32), dequantize_heads(v, kv_scales[1], torch.float32)
