"""The sparse mixture-of-experts block of Mixtral, Qwen2-MoE and Qwen3-MoE, over a flat batch of tokens.

A replicated router picks each token's top-k experts (softmax, then renormalised over the k where the family
does so); the experts' stacked weights go through the fused Triton kernels on CUDA and the plain-PyTorch
reference on CPU. Qwen2-MoE adds a shared expert that every token passes through, scaled by a sigmoid gate.
Tensor parallelism splits every expert (and the shared one) along its intermediate units, like a dense MLP:
each rank computes partial sums of the whole output, reduced once for routed and shared experts together.

On CUDA the block holds no host synchronisation and no data-dependent shape (routing and the block sort are
device tensors of sizes set by the token count), so it sits inside captured decode and piecewise graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from kvpilot.engine.models.arch import ModelArch
from kvpilot.engine.models.layers import MLP
from kvpilot.engine.parallel import TPGroup
from kvpilot.kernels.fused_moe_ref import fused_experts_ref, route
from torch import nn

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
RouteFn = Callable[[torch.Tensor, int, bool], tuple[torch.Tensor, torch.Tensor]]


@cache
def _cuda_kernels() -> tuple[RouteFn, ExpertsFn]:
    try:
        from kvpilot.kernels.fused_moe import fused_experts, route_fused
    except ImportError as exc:  # a reference with host syncs would break CUDA graph capture: refuse instead
        raise RuntimeError(f"mixture-of-experts models on CUDA need Triton for the fused MoE kernel: {exc}") from exc
    return route_fused, fused_experts


class Experts(nn.Module):
    """Every routed expert's weights, stacked as transformers 5 keeps them: gate|up [E, 2I, H], down [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        experts = _cuda_kernels()[1] if x.is_cuda else fused_experts_ref
        return experts(x, self.gate_up_proj, self.down_proj, weights, ids)


class SparseMoE(nn.Module):
    def __init__(self, arch: ModelArch, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.top_k, self.renormalize = arch.num_experts_per_tok, arch.norm_topk_prob
        hidden = arch.hidden_size
        self.gate = nn.Linear(hidden, arch.num_experts, bias=False)
        self.experts = Experts(arch.num_experts, hidden, arch.moe_intermediate_size // tp.size)
        shared = arch.shared_expert_intermediate_size
        self.shared_expert = MLP(hidden, shared, tp, reduce=False) if shared else None
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if shared else None

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sums of the block's output (the whole output when not sharded)."""
        router = _cuda_kernels()[0] if x.is_cuda else route
        weights, ids = router(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.partial(x))


@torch.inference_mode()
def warm_up_experts(model: nn.Module, max_tokens: int) -> int:
    """Compile the fused kernels for every tile config a batch of up to max_tokens tokens can take, before ready.

    Steps larger than the piecewise graphs' buckets run eagerly and pick their config by token count, so
    the graphs alone do not cover them. Local to this rank (no collective); returns the batch sizes run.
    """
    block = next((m for m in model.modules() if isinstance(m, SparseMoE)), None)
    if block is None:
        return 0
    w13 = block.experts.gate_up_proj
    if not w13.is_cuda:
        return 0
    from kvpilot.kernels.fused_moe_config import warm_up_batches

    sizes = warm_up_batches(max_tokens, block.top_k, w13.shape[0], w13.shape[1] // 2, w13.dtype, w13.device)
    for m in sizes:
        block.partial(torch.zeros(m, w13.shape[2], dtype=w13.dtype, device=w13.device))
    return len(sizes)
