"""The block sort before the fused MoE GEMMs: (token, slot) pairs grouped by expert, each expert's run padded
to a multiple of BLOCK_SIZE_M, so every GEMM program's rows share one expert's weights.

At decode sizes an MoE layer is mostly launches, and the PyTorch version of this sort (`align_block_size_ref`) is
~30 small kernels (a histogram, cumsums, a stable argsort, gathers, a scatter, a searchsorted). `_align_kernel`
is one launch of one program per expert, each of which reads every pair's expert id: a histogram of them gives
every expert's padded count and so, summed over the experts before it, where this expert's run starts; a
cumulative sum of "this pair is mine" gives each of its pairs its row, so pairs keep their order within an
expert, exactly as the stable sort does. The program then pads its run, names its blocks' expert, and writes its
share of the unused tail. On an H200 that is 2.6-3.7 us up to 512 pairs, where the single program before
it took 33 us a layer (1.6 ms of a 20 ms Qwen3-30B-A3B decode step at batch 64) and the torch ops 45-74 us
(bench/results/h200-2026-12-02-s6/run1-fused-moe-*.json). Above KERNEL_MAX_PAIRS pairs (long prefills) every
program reading every id catches up with the torch ops (0.131 against 0.123 ms at 32,768 pairs), which take
over there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KERNEL_MAX_PAIRS = 4096
CHUNK = 256


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most rows the expert-aligned layout can need: each expert that receives a pair pads < block_m."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


# The pair count changes with every step's token count: specialising on it (P == 1, P % 16) would compile
# variants under load that warm-up never met. EM is a multiple of BLOCK_M (>= 16) whatever the count.
@triton.jit(do_not_specialize=["P"])
def _align_kernel(
    ids_ptr, sorted_ptr, expert_ids_ptr, total_ptr, P, E, EM,
    BLOCK_M: tl.constexpr, BINS: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Program e places expert e's pairs. BINS >= E + 1: bin E collects the lanes past the last pair."""
    e = tl.program_id(0)
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros([BINS], tl.int32)
    for c0 in range(0, P, CHUNK):
        counts += tl.histogram(tl.load(ids_ptr + c0 + lanes, mask=c0 + lanes < P, other=E).to(tl.int32), BINS)
    bins = tl.arange(0, BINS)
    padded = tl.where(bins < E, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    start = tl.sum(tl.where(bins < e, padded, 0), 0)
    mine = tl.sum(tl.where(bins == e, counts, 0), 0)
    run = (mine + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    total = tl.sum(padded, 0)
    if e == 0:
        tl.store(total_ptr, total)
    placed = start
    for c0 in range(0, P, CHUNK):
        pair = c0 + lanes
        is_mine = (tl.load(ids_ptr + pair, mask=pair < P, other=E).to(tl.int32) == e).to(tl.int32)
        tl.store(sorted_ptr + placed + tl.cumsum(is_mine, 0) - is_mine, pair, mask=is_mine != 0)
        placed += tl.sum(is_mine, 0)
    pads = tl.arange(0, BLOCK_M)
    tl.store(sorted_ptr + start + mine + pads, tl.full([BLOCK_M], 0, tl.int32) + P, mask=pads < run - mine)
    for b0 in range(0, run // BLOCK_M, CHUNK):
        block = b0 + lanes
        tl.store(expert_ids_ptr + start // BLOCK_M + block, tl.full([CHUNK], 0, tl.int32) + e,
                 mask=block < run // BLOCK_M)  # fmt: skip
    # Rows and blocks past the total are never computed on; they read as the torch sort leaves them.
    for r0 in range(total + e * BLOCK_M, EM, E * BLOCK_M):
        tl.store(sorted_ptr + r0 + pads, tl.full([BLOCK_M], 0, tl.int32) + P, mask=r0 + pads < EM)
    for b in range(total // BLOCK_M + e, EM // BLOCK_M, E):
        tl.store(expert_ids_ptr + b, E - 1)


def align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pair ids [EM], expert of each block [EM / block_m], padded total [1]), all int32, on the device.

    Pair p is token p // k's slot p % k. Pads hold T*k. Within an expert pairs keep their order. Every shape
    follows from the token count and nothing is read back on the host, so the forward can be graph-captured.
    """
    if topk_ids.device.type == "meta" or topk_ids.numel() > KERNEL_MAX_PAIRS:
        return align_block_size_ref(topk_ids, block_m, num_experts)
    return align_block_size_kernel(topk_ids, block_m, num_experts)


def align_block_size_kernel(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """align_block_size through the kernel whatever the pair count (the benchmark times both sides of the cut)."""
    pairs = topk_ids.numel()
    em = max_padded_pairs(pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(em, dtype=torch.int32, device=device)
    expert_ids = torch.empty(em // block_m, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    _align_kernel[(num_experts,)](
        topk_ids.reshape(-1), sorted_ids, expert_ids, total, pairs, num_experts, em,
        BLOCK_M=block_m, BINS=triton.next_power_of_2(num_experts + 1), CHUNK=CHUNK, num_warps=4,
    )  # fmt: skip
    return sorted_ids, expert_ids, total


def align_block_size_ref(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same layout from PyTorch ops: the kernel's reference, and the path for long prefills."""
    flat = topk_ids.reshape(-1).long()
    pairs = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    first_unpadded = counts.cumsum(0) - counts
    dest = (ends - padded)[by_expert] + torch.arange(pairs, device=flat.device) - first_unpadded[by_expert]
    em = max_padded_pairs(pairs, num_experts, block_m)
    sorted_ids = torch.full((em,), pairs, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, em, block_m, device=flat.device)
    expert_ids = torch.searchsorted(ends, block_starts, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)
