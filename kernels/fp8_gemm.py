"""FP8 x FP8 matrix product with per-token activation scales and per-output-channel (or block) weight scales.

out [M, N] = sum over K-groups g of (a[:, g] @ b[:, g]^T) * a_scale[:, g] * b_scale[:, g] (+ bias), with a and b
e4m3 and every product accumulated in fp32: a_scale [M, G] and b_scale [N, G] hold one scale per row and group
of `group` columns (G = 1: per token and per channel, the scale is applied once at the end; G > 1: block
scales as DeepSeek-V3 and Qwen3-FP8 ship them, applied to each group's partial sum). On CUDA it is the
alternative to torch._scaled_mm that block scales need; which is faster per shape is bench/fp8_gemm.py's to
measure. Tile sizes follow the token count (decode rows get narrow M tiles): not yet tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpilot.kernels._common import SUPPORTED_DTYPES
from kvpilot.kernels.fp8_math import FP8_DTYPE, dequantize_groups, num_groups


# The token count changes every step: specialising on it would compile variants under load.
@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(
    a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K, num_g, stride_am, stride_bn, stride_cm,
    GROUPED: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if GROUPED:
            g = k0 // GROUP_K
            sa = tl.load(as_ptr + offs_m * num_g + g, mask=m_mask, other=0.0)
            sb = tl.load(bs_ptr + offs_n * num_g + g, mask=n_mask, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        else:
            acc += tl.dot(a, b)
    if not GROUPED:
        sa = tl.load(as_ptr + offs_m, mask=m_mask, other=0.0)
        sb = tl.load(bs_ptr + offs_n, mask=n_mask, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _tiles(m: int, group: int, grouped: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by token count: three variants, all compiled by warm-up."""
    block_k = min(group, 128) if grouped else 128
    if m <= 16:
        return 16, 64, block_k, 4
    if m <= 64:
        return 64, 128, block_k, 4
    return 128, 128, block_k, 8


def _check(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, group: int) -> None:
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise TypeError(f"a and b must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a must be [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    g = num_groups(a.shape[1], group)
    if a_scale.shape != (a.shape[0], g) or b_scale.shape != (b.shape[0], g):
        raise ValueError(f"scales must be [M, {g}] and [N, {g}], got {tuple(a_scale.shape)}, {tuple(b_scale.shape)}")
    if a_scale.dtype != torch.float32 or b_scale.dtype != torch.float32:
        raise TypeError("scales must be float32")
    if a.stride(1) != 1 or b.stride(1) != 1 or not a_scale.is_contiguous() or not b_scale.is_contiguous():
        raise ValueError("a and b must be contiguous along K, and the scales contiguous")
    if g > 1 and (group < 16 or group & (group - 1)):
        raise ValueError(f"a K-group of block scales must be a power of two >= 16, got {group}")


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    group: int,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """a [M, K] e4m3 with a_scale [M, G]; b [N, K] e4m3 with b_scale [N, G]; G = ceil(K / group) -> [M, N]."""
    _check(a, a_scale, b, b_scale, group)
    if out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    g = a_scale.shape[1]
    block_m, block_n, block_k, warps = _tiles(m, group, g > 1)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_gemm_kernel[grid](
        a, b, a_scale, b_scale, bias if bias is not None else out, out, m, n, k, g,
        a.stride(0), b.stride(0), out.stride(0),
        GROUPED=g > 1, GROUP_K=group, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3,
    )  # fmt: skip
    return out


def fp8_gemm_ref(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    group: int,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize both operands, then one float32 matmul: the CPU path and every FP8 GEMM's reference."""
    out = dequantize_groups(a, a_scale, group, torch.float32) @ dequantize_groups(b, b_scale, group, torch.float32).T
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
