"""Shared builders for the kernel tests: random paged caches and the error metric."""

from __future__ import annotations

import torch

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output holds NaN/inf (unwritten or broken)"
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def paged_cache(
    seq_lens: list[int], hkv: int, d: int, page: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches with shuffled physical blocks (plus spares) and the block table that finds them."""
    per_seq = [max(1, -(-n // page)) for n in seq_lens]
    num_blocks = sum(per_seq) + 3
    k_cache = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(seq_lens), max(per_seq) + 1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(per_seq):
        table[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
    return k_cache, v_cache, table
