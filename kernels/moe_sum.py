"""The last step of the fused MoE: each token's k weighted expert rows summed in fp32 and cast, in one launch.

`rows.view(T, k, H).sum(1, dtype=torch.float32).to(dtype)` is two kernels (the reduction, then the cast); a
48-layer decode graph pays both launches in every layer for a few kilobytes of work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sum_kernel(rows_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(rows_ptr + (token * TOP_K + j) * H + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_top_k(rows: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """rows [T*k, H] (token t's k rows adjacent, any float dtype) -> their per-token sum [T, H] in dtype."""
    if rows.dim() != 2 or rows.shape[0] % top_k or not rows.is_contiguous():
        raise ValueError(f"rows must be a contiguous [T*{top_k}, H], got {tuple(rows.shape)}")
    tokens, hidden = rows.shape[0] // top_k, rows.shape[1]
    out = torch.empty((tokens, hidden), dtype=dtype, device=rows.device)
    if tokens:
        block = min(1024, triton.next_power_of_2(hidden))
        _sum_kernel[(tokens, triton.cdiv(hidden, block))](rows, out, hidden, TOP_K=top_k, BLOCK=block, num_warps=4)
    return out


def sum_top_k_ref(rows: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    return rows.view(-1, top_k, rows.shape[1]).sum(dim=1, dtype=torch.float32).to(dtype)
