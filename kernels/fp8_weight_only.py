"""A few activation rows times e4m3 weights: the decode-sized FP8 matmul, bound by reading the weights.

out [M, N] = x [M, K] @ (w [N, K] * w_scale)^T (+ bias), with x in the model's dtype (not quantized) and each
weight tile converted to it in registers, accumulated in fp32; w_scale [N, G] holds one scale per output row
and K-group (G = 1: per channel, applied once at the end; G > 1: block scales, applied to each group's partial
sum). At a few rows the matmul reads N x K weight bytes and does almost no arithmetic, so what counts is
streaming FP8 weights (half of bf16's bytes) at full bandwidth: narrow N tiles give every SM programs, and
nothing quantizes the activations first (torch._scaled_mm at M = 1 measured slower than the bf16 matmul it
replaces on an H200, bench/fp8_gemm.py). For M > 16, for N > MAX_N and for block scales the FP8 x FP8 kernels
are faster; Fp8Linear's `auto` switches there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpilot.kernels._common import SUPPORTED_DTYPES, dot_upcast, mma
from kvpilot.kernels.fp8_math import FP8_DTYPE, dequantize_groups, num_groups

MAX_ROWS = 16


# The row count changes every step: specialising on it would compile variants under load.
@triton.jit(do_not_specialize=["M"])
def _weight_only_kernel(
    x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N, K, num_g, stride_xm, stride_wn, stride_om,
    GROUPED: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(x.dtype)
        part = mma(x, tl.trans(w), PRECISION, UPCAST)
        if GROUPED:
            scale = tl.load(ws_ptr + offs_n * num_g + k0 // GROUP_K, mask=n_mask, other=0.0)
            acc += part * scale[None, :]
        else:
            acc += part
    if not GROUPED:
        acc = acc * tl.load(ws_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# Where it beats the FP8 x FP8 kernels at a few rows (H200, inside CUDA graphs, bench/fp8_gemm.py's sweep at one
# row: 8B qkv 0.016 ms vs scaled_mm 0.019, o 0.012 vs 0.016, down 0.033 vs 0.045); at N = 28,672 (gate/up)
# the Triton FP8 GEMM was faster (0.035 vs 0.044 ms), and with block scales it was everywhere.
MAX_N = 16384


def tiles(group: int, grouped: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): the sweep's best at every 8B shape up to MAX_N."""
    return 32, min(group, 128) if grouped else 512, 4, 4


def fp8_weight_only_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= 16) in the model's dtype; w [N, K] e4m3 with w_scale [N, G], G = ceil(K / group) ->
    [M, N] in x's dtype. `config` overrides tiles() (the benchmark's sweep)."""
    m, k = x.shape
    n = w.shape[0]
    g = num_groups(k, group)
    if w.dtype != FP8_DTYPE or x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"w must be float8_e4m3fn and x a 16/32-bit float, got {w.dtype} and {x.dtype}")
    if m > MAX_ROWS or w.shape[1] != k or w_scale.shape != (n, g) or w_scale.dtype != torch.float32:
        raise ValueError(f"x must be [<= {MAX_ROWS}, K], w [N, K] and w_scale [N, {g}] float32, got "
                         f"{tuple(x.shape)}, {tuple(w.shape)}, {tuple(w_scale.shape)} {w_scale.dtype}")
    if x.stride(1) != 1 or w.stride(1) != 1 or not w_scale.is_contiguous():
        raise ValueError("x and w must be contiguous along K, and w_scale contiguous")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    block_n, block_k, warps, stages = config or tiles(group, g > 1)
    if g > 1 and group % block_k:
        raise ValueError(f"BLOCK_K {block_k} must divide the scale group {group}")
    _weight_only_kernel[(triton.cdiv(n, block_n),)](
        x, w, w_scale, bias if bias is not None else out, out, m, n, k, g, x.stride(0), w.stride(0), out.stride(0),
        GROUPED=g > 1, GROUP_K=group, HAS_BIAS=bias is not None,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", UPCAST=dot_upcast(x.dtype),
    )  # fmt: skip
    return out


def fp8_weight_only_gemm_ref(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, group: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The dequantized weight in one float32 matmul with the unquantized activations."""
    out = x.float() @ dequantize_groups(w, w_scale, group, torch.float32).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
