"""The fused MoE kernels against their PyTorch reference, on the edge cases routing produces; the block
alignment's invariants; routing against transformers' routers; the tile-config tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kvpilot.kernels import fused_moe_config as cfgs
from kvpilot.kernels.fused_moe import align_block_size, fused_experts, fused_experts_ref, max_padded_pairs, route
from kvpilot.kernels.fused_moe_config import MoEConfig
from kvpilot.kernels.moe_align import KERNEL_MAX_PAIRS, align_block_size_ref

from .helpers import DTYPES, TOL, rel_err

H, I = 80, 48  # neither a multiple of the 32-wide tiles below: masked edges in N and K
SMALL = MoEConfig(16, 32, 32, GROUP_SIZE_M=1)
GROUPED = MoEConfig(32, 16, 16, GROUP_SIZE_M=4)


def _weights(experts: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = (torch.randn(experts, 2 * I, H, generator=gen) * H**-0.5).to(dtype)
    w2 = (torch.randn(experts, H, I, generator=gen) * I**-0.5).to(dtype)
    return w13, w2


def _check(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, config: MoEConfig) -> None:
    gen = torch.Generator().manual_seed(ids.numel())
    weights = torch.rand(ids.shape, generator=gen)
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    out = fused_experts(x, w13, w2, weights, ids, config)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, ref) <= TOL[x.dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_token(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    w13, w2 = _weights(8, dtype, gen)
    x = torch.randn(1, H, generator=gen).to(dtype)
    _check(x, w13, w2, torch.tensor([[5, 2]]), SMALL)


@pytest.mark.parametrize("config", [SMALL, GROUPED])
def test_every_token_to_the_same_expert(config: MoEConfig) -> None:
    """37 tokens on one expert: several full blocks and a padded last one; the other experts get nothing."""
    gen = torch.Generator().manual_seed(2)
    w13, w2 = _weights(6, torch.float32, gen)
    x = torch.randn(37, H, generator=gen)
    _check(x, w13, w2, torch.full((37, 1), 3), config)


def test_experts_that_receive_no_token() -> None:
    gen = torch.Generator().manual_seed(3)
    w13, w2 = _weights(16, torch.float32, gen)
    x = torch.randn(9, H, generator=gen)
    ids = torch.tensor([[0, 15], [15, 0], [7, 0], [0, 7]] * 2 + [[15, 7]])  # 13 of 16 experts idle
    _check(x, w13, w2, ids, SMALL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_equals_the_expert_count(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    w13, w2 = _weights(4, dtype, gen)
    x = torch.randn(11, H, generator=gen).to(dtype)
    weights, ids = route(torch.randn(11, 4, generator=gen), top_k=4, renormalize=False)
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    assert rel_err(fused_experts(x, w13, w2, weights, ids, GROUPED), ref) <= TOL[dtype]
    dense = sum(weights[:, k, None] * _expert(x.float(), w13[ids[:, k]].float(), w2[ids[:, k]].float())
                for k in range(4))
    assert rel_err(ref, dense) <= TOL[dtype]  # the reference itself: every expert, weighted


def _expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    h = torch.einsum("th,tnh->tn", x, w13)
    h = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    return torch.einsum("ti,thi->th", h, w2)


def test_random_routing_and_the_default_config() -> None:
    gen = torch.Generator().manual_seed(5)
    w13, w2 = _weights(8, torch.bfloat16, gen)
    x = torch.randn(24, H, generator=gen).to(torch.bfloat16)
    weights, ids = route(torch.randn(24, 8, generator=gen), top_k=2, renormalize=True)
    out = fused_experts(x, w13, w2, weights, ids)  # 24 tokens > 8 experts: the large default tiles
    assert rel_err(out, fused_experts_ref(x, w13, w2, weights, ids)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize(("tokens", "top_k", "experts", "block_m"), [(1, 1, 4, 16), (37, 1, 6, 16), (50, 4, 8, 32)])
def test_alignment_sorts_pairs_into_single_expert_blocks(tokens: int, top_k: int, experts: int, block_m: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    sorted_ids, expert_ids, total = align_block_size(ids, block_m, experts)
    pairs = tokens * top_k
    assert sorted_ids.shape[0] == max_padded_pairs(pairs, experts, block_m)
    assert sorted_ids.shape[0] % block_m == 0 and int(total) % block_m == 0
    flat = ids.flatten()
    real = sorted_ids[: int(total)]
    assert sorted(real[real < pairs].tolist()) == list(range(pairs)), "every pair exactly once"
    assert (sorted_ids[int(total) :] == pairs).all(), "nothing past the padded total"
    for b in range(int(total) // block_m):
        block = real[b * block_m : (b + 1) * block_m]
        block = block[block < pairs]
        assert len(block) and (flat[block.long()] == expert_ids[b]).all(), f"block {b} mixes experts"


@pytest.mark.parametrize(("ids", "experts", "block_m"), [
    ([[3]], 4, 16),                                    # one token
    ([[2, 2]] * 40 + [[2, 1]], 6, 16),                 # nearly every pair on one expert; 82 pairs: two chunks
    ([[0, 5, 1]] * 7, 128, 16),                        # 125 experts receive nothing
    ([[3, 1, 0, 2]] * 3, 4, 32),                       # top-k equal to the expert count
    (None, 128, 64),                                   # 333 random tokens x top-8: the widest decode-free case
])
def test_the_sort_kernel_equals_the_torch_sort(ids: list[list[int]] | None, experts: int, block_m: int) -> None:
    """One launch (a program per expert) does what ~30 torch ops did: the same rows, bit for bit (pairs keep
    their order within an expert, as the stable argsort keeps them), the unused tail included."""
    if ids is None:
        gen = torch.Generator().manual_seed(9)
        topk = torch.stack([torch.randperm(experts, generator=gen)[:8] for _ in range(333)])
    else:
        topk = torch.tensor(ids)
    got = align_block_size(topk, block_m, experts)
    want = align_block_size_ref(topk, block_m, experts)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.int32 and torch.equal(g, w)


def test_long_prefills_sort_with_torch_ops() -> None:
    topk = torch.randint(0, 8, (KERNEL_MAX_PAIRS // 2 + 1, 2))
    assert all(torch.equal(g, w) for g, w in zip(align_block_size(topk, 16, 8), align_block_size_ref(topk, 16, 8),
                                                  strict=True))


@pytest.mark.parametrize("tokens", [1, 37])
def test_routing_and_the_block_sort_are_graph_safe(tokens: int) -> None:
    """On the meta device no tensor has values: routing and the sort run there only if nothing reads a device
    value on the host and every shape follows from the token count alone, as CUDA graph capture requires."""
    weights, ids = route(torch.empty(tokens, 16, device="meta"), top_k=4, renormalize=True)
    sorted_ids, expert_ids, total = align_block_size(ids, 16, 16)
    assert sorted_ids.shape == (max_padded_pairs(tokens * 4, 16, 16),) and weights.shape == (tokens, 4)
    assert expert_ids.shape == (sorted_ids.shape[0] // 16,) and total.shape == (1,)


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_transformers_routers(renormalize: bool) -> None:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    router = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=4,
                                               norm_topk_prob=renormalize))
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(6))
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(7))
    logits, hf_weights, hf_ids = router(x)
    weights, ids = route(logits, 4, renormalize)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights.float())


def test_bad_inputs_are_named() -> None:
    w13, w2 = _weights(4, torch.float32, torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match="top_k"):
        route(torch.zeros(2, 4), top_k=5, renormalize=True)
    with pytest.raises(ValueError, match="do not fit"):
        fused_experts(torch.zeros(2, H + 1), w13, w2, torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="power of two"):
        MoEConfig(24, 32, 32)


def test_config_tables_are_found_by_name_and_nearest_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = cfgs.table_name(8, 48, "cpu", torch.bfloat16)
    assert name == "E=8,N=48,device_name=cpu,dtype=bfloat16.json"
    table = {"1": SMALL.to_json(), "64": GROUPED.to_json(), "1024": MoEConfig(64, 128, 64, 8, 8, 4).to_json()}
    (tmp_path / name).write_text(json.dumps(table))
    monkeypatch.setenv("KVPILOT_FUSED_MOE_CONFIGS", str(tmp_path))
    cfgs.load_table.cache_clear()
    try:
        cpu = torch.device("cpu")
        assert cfgs.get_config(1, 8, 48, torch.bfloat16, cpu) == SMALL
        assert cfgs.get_config(40, 8, 48, torch.bfloat16, cpu) == GROUPED
        assert cfgs.get_config(9000, 8, 48, torch.bfloat16, cpu).BLOCK_SIZE_N == 128
        assert cfgs.get_config(40, 8, 48, torch.float16, cpu) == cfgs.default_config(40, 8), "no table: default"
        warm = cfgs.distinct_configs(2048, 8, 48, torch.bfloat16, cpu)
        assert set(warm) == {SMALL, GROUPED, MoEConfig(64, 128, 64, 8, 8, 4)}
        assert all(cfgs.get_config(m, 8, 48, torch.bfloat16, cpu) == c for c, m in warm.items())
        (tmp_path / name).write_text(json.dumps({"16": {"BLOCK_SIZE_M": 16}}))
        cfgs.load_table.cache_clear()
        with pytest.raises(ValueError, match="entry '16'"):
            cfgs.get_config(16, 8, 48, torch.bfloat16, cpu)
    finally:
        cfgs.load_table.cache_clear()
