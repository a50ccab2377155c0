"""Routing and the experts' forward in plain PyTorch: the CPU path of the MoE block, and the reference the
fused Triton kernels (fused_moe.py) are tested against. No Triton import, so CPU-only installs run it."""

from __future__ import annotations

import torch


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] fp32, expert ids [T, k] int64)."""
    if not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k ({top_k}) must lie between 1 and the number of experts ({logits.shape[-1]})")
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_ref(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]), one expert at a time.

    It reads which experts were hit on the host, so it is never captured in a CUDA graph (the CPU has none).
    """
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    for expert in topk_ids.unique().tolist():  # ascending, as transformers adds them
        token, slot = torch.where(topk_ids == expert)
        h = x[token] @ w13[expert].t()
        h = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        h = (h @ w2[expert].t()) * topk_weights[token, slot, None]
        out.index_add_(0, token, h.to(x.dtype))
    return out
