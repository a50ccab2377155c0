"""The block sort before the fused MoE GEMMs: (token, slot) pairs grouped by expert, each expert's run padded
to a multiple of BLOCK_SIZE_M, so every GEMM program's rows share one expert's weights.

At decode sizes an MoE layer is mostly launches: on an H200 one token took 0.104 ms inside a CUDA graph while
its expert weights take 0.018 ms to read (bench/results/h200-2026-12-01-s4/run5-fused-moe-*.json), and the
PyTorch version of this sort (`align_block_size_ref`) is ~30 small kernels (a histogram, cumsums, a stable
argsort, gathers, a scatter, a searchsorted). `_align_kernel` does it in one program: count per
expert, exclusive sums, then each pair's place (its expert's start, plus the pairs of that expert before it),
chunk by chunk so that pairs keep their order within an expert, exactly as the stable sort does. Above
KERNEL_MAX_PAIRS pairs (long prefills) one program would be slower than the parallel torch ops, which win there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KERNEL_MAX_PAIRS = 4096
CHUNK = 64


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """The most rows the expert-aligned layout can need: each expert that receives a pair pads < block_m."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


# The pair count changes with every step's token count: specialising on it (P == 1, P % 16) would compile
# variants under load that warm-up never met. EM is a multiple of BLOCK_M (>= 16) whatever the count.
@triton.jit(do_not_specialize=["P"])
def _align_kernel(
    ids_ptr, sorted_ptr, expert_ids_ptr, total_ptr, P, E, EM,
    BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    experts = tl.arange(0, E_POW2)
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros([E_POW2], tl.int32)
    for c0 in range(0, P, CHUNK):
        ids = tl.load(ids_ptr + c0 + lanes, mask=c0 + lanes < P, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    placed = ends - padded  # the next free row of each expert's run
    tl.store(total_ptr, tl.sum(padded, 0))
    for s0 in range(0, EM, CHUNK):
        tl.store(sorted_ptr + s0 + lanes, tl.full([CHUNK], 0, tl.int32) + P, mask=s0 + lanes < EM)
    tl.debug_barrier()  # the pads are written before any pair lands on its row
    for c0 in range(0, P, CHUNK):
        pair = c0 + lanes
        ids = tl.load(ids_ptr + pair, mask=pair < P, other=-1).to(tl.int32)
        onehot = ids[:, None] == experts[None, :]
        earlier = (ids[:, None] == ids[None, :]) & (lanes[None, :] < lanes[:, None])
        row = tl.sum(tl.where(onehot, placed[None, :], 0), axis=1) + tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(sorted_ptr + row, pair, mask=pair < P)
        placed += tl.sum(onehot.to(tl.int32), axis=0)
    for b0 in range(0, EM // BLOCK_M, CHUNK):
        block = b0 + lanes
        # searchsorted(ends, block * BLOCK_M, right=True): the experts whose run ends at or before the block
        ended = (ends[None, :] <= (block * BLOCK_M)[:, None]) & (experts[None, :] < E)
        expert = tl.minimum(tl.sum(ended.to(tl.int32), axis=1), E - 1)
        tl.store(expert_ids_ptr + block, expert, mask=block < EM // BLOCK_M)


def align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted pair ids [EM], expert of each block [EM / block_m], padded total [1]), all int32, on the device.

    Pair p is token p // k's slot p % k. Pads hold T*k. Within an expert pairs keep their order. Every shape
    follows from the token count and nothing is read back on the host, so the forward can be graph-captured.
    """
    pairs = topk_ids.numel()
    if topk_ids.device.type == "meta" or pairs > KERNEL_MAX_PAIRS:
        return align_block_size_ref(topk_ids, block_m, num_experts)
    em = max_padded_pairs(pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(em, dtype=torch.int32, device=device)
    expert_ids = torch.empty(em // block_m, dtype=torch.int32, device=device)
    total = torch.empty(1, dtype=torch.int32, device=device)
    _align_kernel[(1,)](
        topk_ids.reshape(-1), sorted_ids, expert_ids, total, pairs, num_experts, em,
        BLOCK_M=block_m, E_POW2=triton.next_power_of_2(num_experts), CHUNK=CHUNK, num_warps=4,
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
