"""Input checks shared by the kernel launchers (bad input fails clearly, not as a wrong result) and the dot helper."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_same(names: str, *tensors: torch.Tensor) -> None:
    """All tensors share one dtype and one device."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{names} must share dtype and device, got {[(x.dtype, x.device) for x in tensors]}")


def check_last_contiguous(name: str, t: torch.Tensor, dims: int = 1) -> None:
    """The innermost `dims` dimensions must be densely packed (the kernels address them as one row)."""
    expected = 1
    for d in range(t.dim() - 1, t.dim() - 1 - dims, -1):
        if t.shape[d] != 1 and t.stride(d) != expected:
            raise ValueError(f"{name} must be contiguous in its last {dims} dim(s), got strides {t.stride()}")
        expected *= t.shape[d]


def check_kv_scales(cache: torch.Tensor, scales: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """An e4m3 cache [num_blocks, block_size, Hkv, D] needs (k_scale, v_scale), each float32 [Hkv]."""
    if cache.dtype != torch.float8_e4m3fn:
        return
    hkv = cache.shape[2]
    if scales is None or any(
        s.shape != (hkv,) or s.dtype != torch.float32 or s.device != cache.device or not s.is_contiguous()
        for s in scales
    ):
        got = None if scales is None else [(s.dtype, tuple(s.shape)) for s in scales]
        raise ValueError(f"an e4m3 KV cache needs k and v scales, float32 [{hkv}] on its device, got {got}")


def check_paged_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Shared by the decode and extend launchers: the layout contract of engine/attention/backend.py.

    The caches hold q's dtype, or e4m3 with per-head scales."""
    check_dtype("q", q)
    check_same("k_cache, v_cache", k_cache, v_cache)
    if k_cache.dtype not in (q.dtype, torch.float8_e4m3fn) or k_cache.device != q.device:
        raise ValueError(f"caches must hold q's dtype ({q.dtype}) or float8_e4m3fn on q's device, "
                         f"got {k_cache.dtype} on {k_cache.device}")
    check_kv_scales(k_cache, kv_scales)
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"q must be [T, Hq, D] and caches [num_blocks, block_size, Hkv, D], "
            f"got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    hq, d = q.shape[1], q.shape[2]
    hkv, page = k_cache.shape[2], k_cache.shape[1]
    if k_cache.shape[3] != d or hq % hkv:
        raise ValueError(f"head_dim must match and Hq ({hq}) be a multiple of Hkv ({hkv})")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")
    if page < 16:
        raise ValueError(f"block_size must be >= 16, got {page}")
    if q.stride(2) != 1:
        raise ValueError("q must be contiguous in head_dim")
    check_last_contiguous("k_cache", k_cache)
    check_last_contiguous("v_cache", v_cache)
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32 or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be contiguous int32 [B, max_blocks], got {block_tables.dtype}")
    if seq_lens.shape != (block_tables.shape[0],) or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"seq_lens must be int32 [{block_tables.shape[0]}], got {seq_lens.dtype} {tuple(seq_lens.shape)}"
        )


# Triton's CPU interpreter multiplies bfloat16 dot operands as raw integers (seen with triton 3.9), so
# under TRITON_INTERPRET=1 bf16 dots run on fp32 copies; compiled kernels never take this branch.
UPCAST_BF16_DOT = os.environ.get("TRITON_INTERPRET") == "1"


def dot_upcast(dtype: torch.dtype) -> bool:
    return UPCAST_BF16_DOT and dtype == torch.bfloat16


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation; PRECISION 'ieee' keeps fp32 inputs exact (no tf32)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


# Triton's CPU interpreter converts float32 to e4m3 without carrying a round-up into the exponent (seen with
# triton 3.9: 124.3 became 64, not 128), so under TRITON_INTERPRET=1 values are first rounded onto the e4m3
# grid in float32 arithmetic, after which the conversion is exact; compiled kernels convert in hardware.
EMULATE_FP8_ROUNDING = UPCAST_BF16_DOT


@triton.jit
def to_fp8(x, FP8_MAX: tl.constexpr, EMULATE: tl.constexpr):
    """float32 -> e4m3, clamped to +-FP8_MAX, rounded to nearest even."""
    x = tl.clamp(x, -FP8_MAX, FP8_MAX)
    if EMULATE:
        # the e4m3 spacing at x's binade (3 mantissa bits; subnormals below 2^-6 share 2^-9), then round to
        # nearest even by adding and subtracting 1.5 * 2^23
        exponent = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
        x = ((x / step + 12582912.0) - 12582912.0) * step
    return x.to(tl.float8e4nv)
