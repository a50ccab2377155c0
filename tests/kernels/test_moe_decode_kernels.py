"""The MoE decode kernels against the PyTorch reference: the one-launch router, the few-token path that
goes pair by pair without sorting, and the top-k sum (run under TRITON_INTERPRET=1, as every kernel test here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kvpilot.kernels import fused_moe_config as cfgs
from kvpilot.kernels.fused_moe import fused_experts, fused_experts_ref, route, route_fused
from kvpilot.kernels.fused_moe_config import GemvConfig, uses_gemv
from kvpilot.kernels.moe_gemv import experts_gemv
from kvpilot.kernels.moe_sum import sum_top_k, sum_top_k_ref

from .helpers import DTYPES, TOL, rel_err

H, I = 80, 48  # neither a multiple of the tiles below: masked edges in N and K
TILES = {"gate_up": GemvConfig(16, 32, 2), "down": GemvConfig(32, 16, 1)}
EVEN = {"gate_up": GemvConfig(16, 16, 2), "down": GemvConfig(16, 16, 2)}  # 80 and 48 divide by 16


def _weights(experts: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = (torch.randn(experts, 2 * I, H, generator=gen) * H**-0.5).to(dtype)
    w2 = (torch.randn(experts, H, I, generator=gen) * I**-0.5).to(dtype)
    return w13, w2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", [TILES, EVEN], ids=["masked", "even"])
@pytest.mark.parametrize("ids", [[[5, 2]], [[1, 1], [3, 1], [1, 3]], [[0, 1, 2, 3]]],
                         ids=["one-token", "experts-hit-twice", "top-k-equals-experts"])
def test_the_few_token_path_matches_the_reference(dtype: torch.dtype, tiles: dict, ids: list[list[int]]) -> None:
    gen = torch.Generator().manual_seed(len(ids))
    w13, w2 = _weights(8 if len(ids[0]) < 4 else 4, dtype, gen)
    topk = torch.tensor(ids)
    x = torch.randn(topk.shape[0], H, generator=gen).to(dtype)
    weights = torch.rand(topk.shape, generator=gen)
    out = experts_gemv(x, w13, w2, weights, topk, tiles)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, fused_experts_ref(x, w13, w2, weights, topk)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "top_k", "hidden"), [(1, 8, 80), (5, 2, 2048 + 7), (3, 1, 16)])
def test_the_top_k_sum_is_the_fp32_sum_of_each_tokens_rows(dtype: torch.dtype, tokens: int, top_k: int,
                                                           hidden: int) -> None:
    rows = torch.randn(tokens * top_k, hidden, generator=torch.Generator().manual_seed(tokens))
    for rows_dtype in (torch.float32, dtype):
        out = sum_top_k(rows.to(rows_dtype), top_k, dtype)
        assert out.dtype == dtype and out.shape == (tokens, hidden)
        assert rel_err(out, sum_top_k_ref(rows.to(rows_dtype), top_k, dtype)) <= TOL[dtype]
    with pytest.raises(ValueError, match="contiguous"):
        sum_top_k(rows.t(), top_k, dtype)


def test_few_tokens_take_the_pair_path_and_many_the_sorted_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert uses_gemv(1, 8, 128) and uses_gemv(8, 8, 128) and not uses_gemv(9, 8, 128)
    assert uses_gemv(1, 2, 8) and uses_gemv(2, 2, 8) and not uses_gemv(3, 2, 8) and not uses_gemv(0, 2, 8)
    import kvpilot.kernels.fused_moe as fm

    taken = []
    monkeypatch.setattr(fm, "experts_gemv", lambda *a: taken.append(a[0].shape[0]) or experts_gemv(*a))
    gen = torch.Generator().manual_seed(3)
    w13, w2 = _weights(16, torch.float32, gen)
    for tokens in (1, 4, 5):
        x = torch.randn(tokens, H, generator=gen)
        weights, ids = route(torch.randn(tokens, 16, generator=gen), top_k=2, renormalize=True)
        assert rel_err(fused_experts(x, w13, w2, weights, ids), fused_experts_ref(x, w13, w2, weights, ids)) <= 1e-5
    assert taken == [1, 4], "up to 8 pairs of 16 experts go pair by pair; 10 pairs sort"


@pytest.mark.parametrize(("experts", "top_k", "renormalize"), [(16, 4, True), (60, 6, False), (8, 2, True),
                                                               (5, 5, False), (128, 8, True)])
def test_the_one_launch_router_equals_route(experts: int, top_k: int, renormalize: bool) -> None:
    """Non-power-of-two expert and k counts exercise the masked lanes and slots."""
    logits = torch.randn(13, experts, generator=torch.Generator().manual_seed(experts))
    weights, ids = route_fused(logits, top_k, renormalize)
    want_w, want_ids = route(logits, top_k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)


def test_bf16_router_ties_pick_the_same_experts_with_the_same_weights() -> None:
    """bf16 logits tie often; among equal logits either order is a correct top-k, so compare by expert."""
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    weights, ids = route_fused(logits, 4, True)
    want_w, want_ids = route(logits, 4, True)
    order, want_order = ids.long().argsort(1), want_ids.argsort(1)
    assert torch.equal(ids.long().gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(weights.gather(1, order), want_w.gather(1, want_order))


def test_the_router_reads_strided_logits_and_refuses_bad_k() -> None:
    wide = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    logits = wide[:, :20]  # rows 40 apart, as a slice of a fused projection would be
    weights, ids = route_fused(logits, 3, True)
    want_w, want_ids = route(logits, 3, True)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights, want_w)
    with pytest.raises(ValueError, match="top_k"):
        route_fused(logits, 21, True)
    assert route_fused(torch.zeros(0, 20), 2, True)[1].shape == (0, 2)


def test_few_token_tiles_come_from_their_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    name = "gemv," + cfgs.table_name(8, 48, "cpu", torch.bfloat16)
    monkeypatch.setenv("KVPILOT_FUSED_MOE_CONFIGS", str(tmp_path))
    cfgs.gemv_configs.cache_clear()
    try:
        assert cfgs.gemv_configs(8, 48, torch.bfloat16, cpu) == cfgs.DEFAULT_GEMV, "no table: the default"
        (tmp_path / name).write_text(json.dumps({k: v.to_json() for k, v in TILES.items()}))
        cfgs.gemv_configs.cache_clear()
        assert cfgs.gemv_configs(8, 48, torch.bfloat16, cpu) == TILES
        (tmp_path / name).write_text(json.dumps({"gate_up": {"BLOCK_N": 16, "BLOCK_K": 24}}))
        cfgs.gemv_configs.cache_clear()
        with pytest.raises(ValueError, match="gemv,E=8"):
            cfgs.gemv_configs(8, 48, torch.bfloat16, cpu)
    finally:
        cfgs.gemv_configs.cache_clear()


def test_warm_up_compiles_the_few_token_path_once_and_each_sorted_tile(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3-30B-A3B routes top-8 of 128: 1-8 tokens go pair by pair (one compiled kernel for all), 9+ sort;
    the sorted tiles' smallest batches start at 9, not at 1, where the few-token path would take the batch."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("KVPILOT_FUSED_MOE_CONFIGS", str(tmp_path))  # no table: the default tiles
    cfgs.load_table.cache_clear()
    try:
        assert cfgs.warm_up_batches(8192, 8, 128, 768, torch.bfloat16, cpu) == [1, 9, 129]
        assert cfgs.warm_up_batches(8, 8, 128, 768, torch.bfloat16, cpu) == [1]
        assert cfgs.warm_up_batches(4096, 2, 8, 1792, torch.bfloat16, cpu) == [1, 3, 9], "Mixtral: 1-2 tokens"
        assert cfgs.warm_up_batches(100, 8, 8, 64, torch.bfloat16, cpu) == [1, 9], "top-8 of 8: never few-token"
    finally:
        cfgs.load_table.cache_clear()
