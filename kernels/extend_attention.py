"""Prefill/extend attention over the paged KV cache: causal, variable lengths, cached prefix + new chunk.

Each sequence's new queries sit at the end of its context (positions seq_len - q_len .. seq_len - 1) and
attend over every cached key up to their own position, so plain prefill, chunked prefill and prefix-cache
hits are one kernel. Flash-attention style: K/V tiles stream through an online softmax in fp32; tiles wholly
below the causal diagonal skip the mask. With a sliding window of w a query at p sees keys p - w + 1 .. p:
a tile of queries starts at the first key its first query sees, tiles inside every query's window skip the
mask, and blocks before the window are never read. With no cache (the engine's profiling pass) K/V come from
the step's own flat tensors and each sequence sees only its own new tokens. An e4m3 cache is converted in
registers, its per-head scales folded into the softmax scale (K) and the output (V).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from kvpilot.kernels._common import check_dtype, check_paged_inputs, check_same, dot_upcast, mma
from kvpilot.kernels.fp8_math import is_fp8
from kvpilot.kernels.paged_decode_attention import read_kv
from triton.runtime.errors import OutOfResources

_LOG2E = 1.4426950408889634
# 128-key tiles measured fastest on an H100 (bench/README.md); launches that overflow shared memory step down.
_DEFAULT_BLOCK_N = 128
_FITTED_BLOCK_N: dict[tuple, int] = {}


@triton.jit
def _kv_offsets(bt_row, row0, offs_n, n_mask, stride_0, stride_1, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Offset of key n's row: through the block table when paged, else flat token row0 + n."""
    if PAGED:
        page = tl.load(bt_row + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        return page * stride_0 + (offs_n % PAGE) * stride_1
    return (row0 + offs_n).to(tl.int64) * stride_0


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, k_base, v_base, bt_row, row0, n0, first, end, q_pos, qk_scale, window,
    stride_k0, stride_k1, stride_v0, stride_v1,
    offs_d, MASKED: tl.constexpr, SLIDING: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end
    if SLIDING:  # keys before `first` (the tile's first query's window) may sit in blocks given back: not read
        n_mask = n_mask & (offs_n >= first)
    k_off = _kv_offsets(bt_row, row0, offs_n, n_mask, stride_k0, stride_k1, PAGED, PAGE)
    v_off = _kv_offsets(bt_row, row0, offs_n, n_mask, stride_v0, stride_v1, PAGED, PAGE)
    if MASKED:
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
    else:
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :])
    if FP8:
        k = k.to(q.dtype)
    s = mma(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if SLIDING:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = m_new
    if SLIDING:  # a row can see nothing in a tile before its window: keep its sums at zero, not NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
    else:
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :])
    if FP8:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, PRECISION, UPCAST)
    return acc, m_new, l_i


# The block-table width changes with every batch: specialising on it would compile variants under load.
@triton.jit(do_not_specialize=["stride_bt", "window"])
def _extend_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_q_ptr, seq_lens_ptr, block_tables_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, window,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_k0, stride_k1, stride_kh, stride_v0, stride_v1, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    FP8: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    b = tl.program_id(1)
    pid_m = tl.num_programs(2) - 1 - tl.program_id(2)  # longest (most causal work) tiles start first
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    ctx_len = tl.load(seq_lens_ptr + b) if PAGED else q_len
    prefix = ctx_len - q_len
    m0 = pid_m * BLOCK_M
    live = m0 < q_len
    # Keys below the tile's first query position need no causal mask; the rest up to its last one do.
    full_end = tl.where(live, (prefix + m0) // BLOCK_N * BLOCK_N, 0)
    end = tl.where(live, tl.minimum(ctx_len, prefix + m0 + BLOCK_M), 0)
    # Under a window: from the first key the first query sees; unmasked only where every query sees the tile.
    first = 0
    lo = 0
    full_start = 0
    if SLIDING:
        first = tl.maximum(prefix + m0 - window + 1, 0)
        lo = tl.where(live, first // BLOCK_N * BLOCK_N, 0)
        inside = tl.cdiv(prefix + m0 + BLOCK_M - window, BLOCK_N) * BLOCK_N
        full_start = tl.minimum(tl.maximum(inside, lo), full_end)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_q_t + h * stride_q_h + offs_d[None, :], mask=m_mask[:, None], other=0.0
    )
    q_pos = prefix + offs_m
    kvh = h // GROUP
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kvh)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if SLIDING:
        for n0 in range(lo, full_start, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_base, v_base, bt_row, q_start, n0, first, end, q_pos, qk_scale, window,
                stride_k0, stride_k1, stride_v0, stride_v1, offs_d, True, SLIDING, PAGED, PAGE, BLOCK_N, PRECISION,
                UPCAST, FP8,
            )  # fmt: skip
    for n0 in range(full_start, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_base, v_base, bt_row, q_start, n0, first, end, q_pos, qk_scale, window,
            stride_k0, stride_k1, stride_v0, stride_v1, offs_d, False, SLIDING, PAGED, PAGE, BLOCK_N, PRECISION,
            UPCAST, FP8,
        )  # fmt: skip
    for n0 in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_base, v_base, bt_row, q_start, n0, first, end, q_pos, qk_scale, window,
            stride_k0, stride_k1, stride_v0, stride_v1, offs_d, True, SLIDING, PAGED, PAGE, BLOCK_N, PRECISION,
            UPCAST, FP8,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if FP8:
        out = out * tl.load(v_scale_ptr + kvh)
    o_ptr = out_ptr + q_rows[:, None] * stride_o_t + h * stride_o_h + offs_d[None, :]
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    block_m: int = 128,
    block_n: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
    window: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] flat over sequences -> [T, Hq, D], each query attending over its paged context causally
    (within the last `window` positions when given).

    An e4m3 cache needs kv_scales (k_scale, v_scale), each [Hkv] float32."""
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, kv_scales)
    _check_cu(cu_seqlens_q, block_tables.shape[0])
    page = k_cache.shape[1]
    return _launch(
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, max_query_len, scale,
        (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)),
        (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)),
        page, True, block_m, block_n, num_warps, num_stages, window,
        kv_scales if is_fp8(k_cache.dtype) else None,
    )  # fmt: skip


def varlen_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_query_len: int,
    scale: float,
    block_m: int = 128,
    block_n: int | None = None,
    num_warps: int = 8,
    num_stages: int = 3,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention within each sequence's own tokens of flat q [T, Hq, D], k/v [T, Hkv, D] (no cache)."""
    check_dtype("q", q)
    check_same("q, k, v", q, k, v)
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q must be [T, Hq, D] and k, v [T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    d = q.shape[2]
    if d < 16 or d & (d - 1) or q.shape[1] % k.shape[1]:
        raise ValueError(f"head_dim must be a power of two >= 16 and Hq a multiple of Hkv, got {tuple(q.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("q, k and v must be contiguous in head_dim")
    _check_cu(cu_seqlens_q, cu_seqlens_q.shape[0] - 1)
    batch = cu_seqlens_q.shape[0] - 1
    dummy = torch.zeros((max(batch, 1), 1), dtype=torch.int32, device=q.device)
    return _launch(
        q, k, v, cu_seqlens_q, dummy[:, 0].contiguous(), dummy, max_query_len, scale,
        (k.stride(0), 0, k.stride(1)), (v.stride(0), 0, v.stride(1)),
        16, False, block_m, block_n, num_warps, num_stages, window,
    )  # fmt: skip


def _check_cu(cu_seqlens_q: torch.Tensor, batch: int) -> None:
    if cu_seqlens_q.shape != (batch + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens_q must be int32 [{batch + 1}], got {cu_seqlens_q.dtype} {tuple(cu_seqlens_q.shape)}"
        )


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    k_strides: tuple[int, int, int],
    v_strides: tuple[int, int, int],
    page: int,
    paged: bool,
    block_m: int,
    block_n: int | None,
    num_warps: int,
    num_stages: int,
    window: int | None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    batch = cu_seqlens_q.shape[0] - 1
    if q.shape[0] == 0 or batch == 0 or max_query_len <= 0:
        return out
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[2] if paged else k.shape[1]
    grid = (hq, batch, triton.cdiv(max_query_len, block_m))
    k_scale, v_scale = kv_scales if kv_scales is not None else (seq_lens, seq_lens)
    fit_key = (q.device, q.dtype, d, block_m, num_warps, num_stages, kv_scales is not None)
    auto = block_n is None
    tile_n = _FITTED_BLOCK_N.get(fit_key, _DEFAULT_BLOCK_N) if block_n is None else block_n
    while True:
        try:
            _extend_kernel[grid](
                q, k, v, out, cu_seqlens_q, seq_lens, block_tables, k_scale, v_scale,
                scale * _LOG2E, window or 0,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                *k_strides, *v_strides,
                block_tables.stride(0),
                GROUP=hq // hkv, HEAD_DIM=d, PAGED=paged, PAGE=page, SLIDING=bool(window),
                BLOCK_M=block_m, BLOCK_N=tile_n,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=dot_upcast(q.dtype),
                FP8=kv_scales is not None, num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
            return out
        except OutOfResources:
            # e.g. fp32, or a GPU with less shared memory than an H100: halve the key tile and remember it
            if not auto or tile_n <= 16:
                raise
            tile_n //= 2
            _FITTED_BLOCK_N[fit_key] = tile_n


def _causal_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """q [n, Hq, D] at the last n positions of k, v [ctx, Hkv, D] -> [n, Hq, D] in fp32."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    n, ctx = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    keys = torch.arange(ctx, device=q.device)[None, :]
    q_pos = (ctx - n + torch.arange(n, device=q.device))[:, None]
    visible = (keys <= q_pos) & (keys > q_pos - window) if window else keys <= q_pos
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def extend_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    window: int | None = None,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    page = k_cache.shape[1]
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for i, ctx in enumerate(seq_lens.tolist()):
        pos = torch.arange(ctx, device=q.device)
        slots = block_tables[i, pos // page].long() * page + pos % page
        k, v = read_kv(k_cache, v_cache, slots, kv_scales)
        out[cu[i] : cu[i + 1]] = _causal_ref(q[cu[i] : cu[i + 1]], k, v, scale, window).to(q.dtype)
    return out


def varlen_causal_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_query_len: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for a, z in itertools.pairwise(cu):
        out[a:z] = _causal_ref(q[a:z], k[a:z], v[a:z], scale, window).to(q.dtype)
    return out
