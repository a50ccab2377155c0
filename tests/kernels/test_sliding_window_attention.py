"""Paged decode, paged extend and no-cache attention under a sliding window, against their references.

Blocks wholly before a query's window point at a block of NaNs: the KV manager may have given them to
another sequence, so a kernel that read them (even masked) would return NaN.
"""

from __future__ import annotations

import pytest
import torch
from kvpilot.kernels.extend_attention import (
    extend_attention,
    extend_attention_ref,
    varlen_causal_attention,
    varlen_causal_attention_ref,
)
from kvpilot.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref

from .helpers import TOL, paged_cache, rel_err

D, PAGE = 32, 16


def _poison_before(k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                   first_seen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Point every block wholly before first_seen[i] at a new all-NaN block; return the grown caches."""
    nan = torch.full((1, *k_cache.shape[1:]), float("nan"), dtype=k_cache.dtype)
    poisoned = k_cache.shape[0]
    for i, first in enumerate(first_seen):
        table[i, : first // PAGE] = poisoned
    return torch.cat([k_cache, nan]), torch.cat([v_cache, nan])


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [5, 16, 37])
def test_decode_attends_within_the_window(dtype: torch.dtype, window: int) -> None:
    gen = torch.Generator().manual_seed(window)
    seq_lens = [1, 10, PAGE, 40, 150]
    k_cache, v_cache, table = paged_cache(seq_lens, 2, D, PAGE, dtype, gen)
    k_cache, v_cache = _poison_before(k_cache, v_cache, table, [max(0, n - window) for n in seq_lens])
    q = torch.randn(len(seq_lens), 8, D, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, table, lens, 0.3, window=window)
    for splits in (1, 4):
        out = paged_decode_attention(q, k_cache, v_cache, table, lens, 0.3, num_splits=splits, block_n=16,
                                     window=window)  # fmt: skip
        assert rel_err(out, ref) <= TOL[dtype], f"num_splits={splits}"
    full = paged_decode_attention_ref(q, k_cache.nan_to_num(), v_cache.nan_to_num(), table, lens, 0.3)
    assert rel_err(ref, full) > 1e-3, "the window changes the result: the test sees it"


@pytest.mark.parametrize("window", [5, 16, 37])
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (32, 16), (16, 32)])
def test_extend_attends_within_the_window(window: int, block_m: int, block_n: int) -> None:
    """Full prefill, a prefix hit, a chunk across a block boundary, decode rows. block_m > block_n leaves
    rows that see nothing of a tile; block_n > the page size rounds the first tile into a released block."""
    gen = torch.Generator().manual_seed(window * block_m + block_n)
    parts = [(0, 37), (2 * PAGE, 20), (PAGE - 5, 5 + PAGE), (70, 1), (0, 1)]
    seq_lens, q_lens = [p + n for p, n in parts], [n for _, n in parts]
    k_cache, v_cache, table = paged_cache(seq_lens, 2, D, PAGE, torch.float32, gen)
    k_cache, v_cache = _poison_before(k_cache, v_cache, table, [max(0, p - window + 1) for p, _ in parts])
    q = torch.randn(sum(q_lens), 4, D, generator=gen)
    cu, lens = _cu(q_lens), torch.tensor(seq_lens, dtype=torch.int32)
    ref = extend_attention_ref(q, k_cache.nan_to_num(), v_cache.nan_to_num(), cu, lens, table, max(q_lens), 0.25,
                               window=window)  # fmt: skip
    out = extend_attention(q, k_cache, v_cache, cu, lens, table, max(q_lens), 0.25, block_m=block_m, block_n=block_n,
                           num_warps=4, window=window)  # fmt: skip
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_extend_window_in_half_precision() -> None:
    gen = torch.Generator().manual_seed(9)
    parts = [(40, 50), (0, 64)]
    seq_lens, q_lens = [p + n for p, n in parts], [n for _, n in parts]
    k_cache, v_cache, table = paged_cache(seq_lens, 1, D, PAGE, torch.bfloat16, gen)
    q = torch.randn(sum(q_lens), 2, D, generator=gen).bfloat16()
    cu, lens = _cu(q_lens), torch.tensor(seq_lens, dtype=torch.int32)
    ref = extend_attention_ref(q, k_cache, v_cache, cu, lens, table, 64, 0.2, window=24)
    out = extend_attention(q, k_cache, v_cache, cu, lens, table, 64, 0.2, block_m=32, block_n=32, num_warps=4,
                           window=24)  # fmt: skip
    assert rel_err(out, ref) <= TOL[torch.bfloat16]


def test_varlen_attends_within_the_window() -> None:
    gen = torch.Generator().manual_seed(5)
    q_lens = [1, 19, 40]
    k = torch.randn(sum(q_lens), 2, D, generator=gen)
    v = torch.randn(sum(q_lens), 2, D, generator=gen)
    q = torch.randn(sum(q_lens), 4, D, generator=gen)
    cu = _cu(q_lens)
    out = varlen_causal_attention(q, k, v, cu, 40, 0.3, block_m=32, block_n=16, num_warps=4, window=7)
    assert rel_err(out, varlen_causal_attention_ref(q, k, v, cu, 40, 0.3, window=7)) <= TOL[torch.float32]
