"""MoE routing in one Triton program per token: softmax over the router logits in fp32, top-k, renormalisation.

The PyTorch form (`route` in fused_moe_ref.py: a cast, a softmax, a topk, a sum and a divide) is five kernels
per layer; in a captured decode step of a 48-layer MoE each is a launch the GPU waits on, for a few hundred
bytes of work. Here top-k is k rounds of arg-max over the E lanes of one row (ties go to the lower expert id),
which is cheap for the expert counts MoE models use (8 to 512).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    logits_ptr, weights_ptr, ids_ptr, E, stride_t,
    TOP_K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr, RENORM: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, E_POW2)
    valid = lanes < E
    x = tl.load(logits_ptr + t * stride_t + lanes, mask=valid, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, 0))
    left = tl.where(valid, e / tl.sum(e, 0), -1.0)  # probabilities are >= 0: -1 is never picked
    slots = tl.arange(0, K_POW2)
    picked_w = tl.zeros([K_POW2], tl.float32)
    picked_id = tl.zeros([K_POW2], tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(left, 0)
        idx = tl.min(tl.where(left == best, lanes, E_POW2), 0)
        picked_w = tl.where(slots == j, best, picked_w)
        picked_id = tl.where(slots == j, idx, picked_id)
        left = tl.where(lanes == idx, -1.0, left)
    if RENORM:
        picked_w = picked_w / tl.sum(picked_w, 0)
    tl.store(weights_ptr + t * TOP_K + slots, picked_w, mask=slots < TOP_K)
    tl.store(ids_ptr + t * TOP_K + slots, picked_id, mask=slots < TOP_K)


def route_fused(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] fp32, expert ids [T, k] int32): `route`'s function, one launch."""
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [T, E], got {tuple(logits.shape)}")
    tokens, experts = logits.shape
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k ({top_k}) must lie between 1 and the number of experts ({experts})")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((tokens, top_k), dtype=torch.int32, device=logits.device)
    if tokens:
        e_pow2 = triton.next_power_of_2(experts)
        _route_kernel[(tokens,)](
            logits, weights, ids, experts, logits.stride(0),
            TOP_K=top_k, K_POW2=triton.next_power_of_2(top_k), E_POW2=e_pow2, RENORM=renormalize,
            num_warps=1 if e_pow2 <= 256 else 4,
        )  # fmt: skip
    return weights, ids
