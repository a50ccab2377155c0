"""Paged decode, paged extend and no-cache varlen attention against their PyTorch references."""

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

from .helpers import DTYPES, TOL, paged_cache, rel_err

D = 32


def _cu(lens: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    return cu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("page", "heads"), [(16, (8, 2)), (32, (4, 4)), (16, (4, 1))])
def test_decode(dtype: torch.dtype, page: int, heads: tuple[int, int]) -> None:
    """Single-token context, exact block boundaries and one past them, a long context; GQA and MHA."""
    gen = torch.Generator().manual_seed(page + heads[0])
    hq, hkv = heads
    seq_lens = [1, page, page + 1, 2 * page, 150]
    k_cache, v_cache, table = paged_cache(seq_lens, hkv, D, page, dtype, gen)
    q = torch.randn(len(seq_lens), hq, D, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, table, lens, 0.3)
    for splits in (1, 4):  # 4 splits leave the short sequences with empty splits
        out = paged_decode_attention(q, k_cache, v_cache, table, lens, 0.3, num_splits=splits, block_n=32)
        assert rel_err(out, ref) <= TOL[dtype], f"num_splits={splits}"


def test_decode_default_splits_and_strided_q() -> None:
    gen = torch.Generator().manual_seed(7)
    k_cache, v_cache, table = paged_cache([300, 33], 2, D, 16, torch.float32, gen)
    qkv = torch.randn(2, 3, 4, D, generator=gen)
    q = qkv[:, 0]  # [B, Hq, D] with a token stride of 3 * Hq * D
    lens = torch.tensor([300, 33], dtype=torch.int32)
    out = paged_decode_attention(q, k_cache, v_cache, table, lens, 0.2, max_seq_len=300)
    assert rel_err(out, paged_decode_attention_ref(q, k_cache, v_cache, table, lens, 0.2)) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("page", "heads"), [(16, (8, 2)), (32, (2, 2))])
def test_extend_cached_prefix_and_new_chunk(dtype: torch.dtype, page: int, heads: tuple[int, int]) -> None:
    """Mixed batch: full prefill, a prefix-cache hit, a chunk ending on a block boundary, decode rows."""
    gen = torch.Generator().manual_seed(page * 3 + heads[0])
    hq, hkv = heads
    # (cached prefix, new tokens) per sequence
    parts = [(0, 37), (2 * page, 20), (page - 5, 5 + page), (70, 1), (0, 1)]
    seq_lens = [p + n for p, n in parts]
    q_lens = [n for _, n in parts]
    k_cache, v_cache, table = paged_cache(seq_lens, hkv, D, page, dtype, gen)
    q = torch.randn(sum(q_lens), hq, D, generator=gen).to(dtype)
    cu, lens = _cu(q_lens), torch.tensor(seq_lens, dtype=torch.int32)
    ref = extend_attention_ref(q, k_cache, v_cache, cu, lens, table, max(q_lens), 0.25)
    out = extend_attention(q, k_cache, v_cache, cu, lens, table, max(q_lens), 0.25, block_m=16, block_n=16, num_warps=4)
    assert rel_err(out, ref) <= TOL[dtype]


def test_extend_tiles_larger_than_blocks() -> None:
    """block_n spanning two pages and block_m spanning several diagonal tiles."""
    gen = torch.Generator().manual_seed(11)
    parts = [(40, 50), (0, 64)]
    seq_lens, q_lens = [p + n for p, n in parts], [n for _, n in parts]
    k_cache, v_cache, table = paged_cache(seq_lens, 1, D, 16, torch.float16, gen)
    q = torch.randn(sum(q_lens), 2, D, generator=gen).half()
    cu, lens = _cu(q_lens), torch.tensor(seq_lens, dtype=torch.int32)
    ref = extend_attention_ref(q, k_cache, v_cache, cu, lens, table, 64, 0.2)
    out = extend_attention(q, k_cache, v_cache, cu, lens, table, 64, 0.2, block_m=32, block_n=32, num_warps=4)
    assert rel_err(out, ref) <= TOL[torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_within_step(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    q_lens = [1, 19, 40]
    k = torch.randn(sum(q_lens), 2, D, generator=gen).to(dtype)
    v = torch.randn(sum(q_lens), 2, D, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), 4, D, generator=gen).to(dtype)
    cu = _cu(q_lens)
    out = varlen_causal_attention(q, k, v, cu, 40, 0.3, block_m=16, block_n=16, num_warps=4)
    assert rel_err(out, varlen_causal_attention_ref(q, k, v, cu, 40, 0.3)) <= TOL[dtype]


def test_attention_rejects_bad_layout() -> None:
    k_cache = torch.zeros(2, 8, 1, D)
    with pytest.raises(ValueError, match="block_size"):
        paged_decode_attention(torch.randn(1, 1, D), k_cache, k_cache, torch.zeros(1, 1, dtype=torch.int32),
                               torch.ones(1, dtype=torch.int32), 1.0)  # fmt: skip
    k_cache = torch.zeros(2, 16, 3, D)
    with pytest.raises(ValueError, match="multiple"):
        extend_attention(torch.randn(1, 4, D), k_cache, k_cache, _cu([1]), torch.ones(1, dtype=torch.int32),
                         torch.zeros(1, 1, dtype=torch.int32), 1, 1.0)  # fmt: skip


def test_extend_default_tile_steps_down_when_shared_memory_overflows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch rejected for shared memory retries with half the key tile, and the fit is remembered."""
    import kvpilot.kernels.extend_attention as ea

    real = ea._extend_kernel
    tried: list[int] = []

    class SmallSmem:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                tried.append(kwargs["BLOCK_N"])
                if kwargs["BLOCK_N"] > 32:
                    raise ea.OutOfResources(300_000, 232_448, "shared memory")
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(ea, "_extend_kernel", SmallSmem())
    monkeypatch.setattr(ea, "_FITTED_BLOCK_N", {})
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, table = paged_cache([40], 1, D, 16, torch.float32, gen)
    q = torch.randn(8, 2, D, generator=gen)
    cu, lens = _cu([8]), torch.tensor([40], dtype=torch.int32)
    ref = extend_attention_ref(q, k_cache, v_cache, cu, lens, table, 8, 0.2)
    for _ in range(2):
        out = extend_attention(q, k_cache, v_cache, cu, lens, table, 8, 0.2, block_m=16, num_warps=4)
        assert rel_err(out, ref) <= 1e-5
    assert tried == [128, 64, 32, 32]
    with pytest.raises(ea.OutOfResources):  # an explicit tile is never changed behind the caller's back
        extend_attention(q, k_cache, v_cache, cu, lens, table, 8, 0.2, block_m=16, block_n=64, num_warps=4)
