"""Dynamic activation quantization to e4m3: one scale per token (or per token and `group` columns), one pass.

Each program reads one group of one row, takes its absolute maximum, and writes the e4m3 values and the scale
(amax / 448), exactly as kernels/fp8_math.quantize_groups defines them. Its reference is that function.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kvpilot.kernels._common import EMULATE_FP8_ROUNDING, check_dtype, check_last_contiguous, to_fp8
from kvpilot.kernels.fp8_math import FP8_DTYPE, FP8_MAX, MIN_AMAX, num_groups, quantize_groups


# The token count changes every step: specialising on it would compile variants under load.
@triton.jit(do_not_specialize=["rows"])
def _quant_kernel(x_ptr, q_ptr, s_ptr, rows, length, stride_x, stride_q, num_g, GROUP: tl.constexpr,
                  BLOCK: tl.constexpr, FP8_MAX_C: tl.constexpr, MIN_AMAX_C: tl.constexpr, EMULATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    if row < rows:
        offs = g * GROUP + tl.arange(0, BLOCK)
        mask = (offs < length) & (tl.arange(0, BLOCK) < GROUP)
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), 0), MIN_AMAX_C) / FP8_MAX_C
        tl.store(q_ptr + row * stride_q + offs, to_fp8(x / scale, FP8_MAX_C, EMULATE), mask=mask)
        tl.store(s_ptr + row * num_g + g, scale)


def quantize_rows(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (e4m3 [T, K], float32 scales [T, ceil(K / group)]); group None: one scale per row."""
    check_dtype("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, K], got {tuple(x.shape)}")
    check_last_contiguous("x", x)
    rows, length = x.shape
    group = group or length
    g = num_groups(length, group)
    q = torch.empty((rows, length), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((rows, g), dtype=torch.float32, device=x.device)
    if rows and length:
        _quant_kernel[(rows, g)](
            x, q, scales, rows, length, x.stride(0), q.stride(0), g,
            GROUP=group, BLOCK=triton.next_power_of_2(group), FP8_MAX_C=FP8_MAX, MIN_AMAX_C=MIN_AMAX,
            EMULATE=EMULATE_FP8_ROUNDING, num_warps=4,
        )  # fmt: skip
    return q, scales


def quantize_rows_ref(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_groups(x, group or x.shape[-1])
