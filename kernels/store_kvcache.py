"""Writes a step's new K/V rows into the paged cache at their slots; slot -1 (padding) is skipped.

An e4m3 cache stores each row divided by its head's scale (k_scale, v_scale [Hkv], float32), clamped to e4m3's
range: the attention kernels multiply the scale back in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpilot.kernels._common import (
    EMULATE_FP8_ROUNDING,
    check_dtype,
    check_kv_scales,
    check_last_contiguous,
    check_same,
    to_fp8,
)
from kvpilot.kernels.fp8_math import FP8_MAX, is_fp8, quantize_heads


@triton.jit
def _store_kvcache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_k_t,
    stride_v_t,
    stride_kc_slot,
    stride_vc_slot,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    FP8: tl.constexpr,
    FP8_MAX_C: tl.constexpr,
    EMULATE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        k = tl.load(k_ptr + t.to(tl.int64) * stride_k_t + offs, mask=mask)
        v = tl.load(v_ptr + t.to(tl.int64) * stride_v_t + offs, mask=mask)
        if FP8:
            k_s = tl.load(k_scale_ptr + offs // HEAD_DIM, mask=mask, other=1.0)
            v_s = tl.load(v_scale_ptr + offs // HEAD_DIM, mask=mask, other=1.0)
            k = to_fp8(k.to(tl.float32) / k_s, FP8_MAX_C, EMULATE)
            v = to_fp8(v.to(tl.float32) / v_s, FP8_MAX_C, EMULATE)
        tl.store(k_cache_ptr + slot * stride_kc_slot + offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + slot * stride_vc_slot + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    scales: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(
            f"caches must be [num_blocks, block_size, {k.shape[1]}, {k.shape[2]}], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if slots.shape != (k.shape[0],) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32/int64 [{k.shape[0]}], got {slots.dtype} {tuple(slots.shape)}")
    check_dtype("k", k)
    check_same("k, v", k, v)
    check_same("k_cache, v_cache", k_cache, v_cache)
    check_kv_scales(k_cache, scales)
    for name, t in (("k", k), ("v", v)):
        check_last_contiguous(name, t, 2)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_last_contiguous(name, t, 3)


def store_kvcache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """k, v [T, Hkv, D] -> k_cache, v_cache [num_blocks, block_size, Hkv, D] at flat slot_mapping[t].

    kv_scales (k_scale, v_scale), each [Hkv] float32, are required by an e4m3 cache and ignored by any other.
    """
    _check(k, v, k_cache, v_cache, slot_mapping, kv_scales)
    if k.shape[0] == 0:
        return
    row = k.shape[1] * k.shape[2]
    fp8 = is_fp8(k_cache.dtype)
    k_scale, v_scale = kv_scales if fp8 and kv_scales is not None else (slot_mapping, slot_mapping)
    _store_kvcache_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        k.stride(0), v.stride(0), k_cache.stride(1), v_cache.stride(1),
        ROW=row, BLOCK=triton.next_power_of_2(row), HEAD_DIM=k.shape[2], FP8=fp8, FP8_MAX_C=FP8_MAX,
        EMULATE=EMULATE_FP8_ROUNDING,
    )  # fmt: skip


def store_kvcache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k, v = k[keep], v[keep]
    if is_fp8(k_cache.dtype):
        check_kv_scales(k_cache, kv_scales)
        assert kv_scales is not None
        k, v = quantize_heads(k, kv_scales[0]), quantize_heads(v, kv_scales[1])
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k.to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v.to(v_cache.dtype)
