"""Building blocks of the decoder in plain PyTorch; the CUDA path swaps in Triton kernels of the same math."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from types import ModuleType
from typing import Any

import torch
from kvpilot.engine.parallel import TPGroup
from kvpilot.kernels.rope_cache import build_rope_cache
from torch import nn


@cache
def _fused() -> ModuleType | None:
    """The Triton kernels, when this machine can run them on its GPU."""
    if not torch.cuda.is_available():
        return None
    try:
        import kvpilot.kernels.activation as activation
        import kvpilot.kernels.rms_norm as rms_norm
        import kvpilot.kernels.rotary as rotary
    except ImportError:
        return None
    module = ModuleType("fused")
    module.rms_norm = rms_norm.rms_norm
    module.fused_add_rms_norm = rms_norm.fused_add_rms_norm
    module.rotary_embedding = rotary.rotary_embedding
    module.silu_and_mul = activation.silu_and_mul
    return module


def _kernels_for(x: torch.Tensor) -> ModuleType | None:
    return _fused() if x.is_cuda else None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, exactly as Hugging Face's Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = _kernels_for(x)
        if fused is not None and x.dim() == 2 and x.stride(-1) == 1:
            return fused.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual add then norm: returns (normed, new residual)."""
        fused = _kernels_for(x)
        if fused is not None:
            return fused.fused_add_rms_norm(x, residual, self.weight, self.eps)
        residual = x + residual
        return self.forward(residual), residual


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding from a cos/sin table indexed by absolute position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any]) -> None:
        super().__init__()
        cos, sin = build_rope_cache(head_dim, max_positions, theta, scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                norms: tuple[RMSNorm, RMSNorm] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated q and k; with `norms` (Qwen3's q_norm and k_norm) each head is RMS-normalised first."""
        fused = _kernels_for(q)
        if fused is not None:  # normalises and rotates the views of the fused qkv output in place: no copies
            weights = (norms[0].weight, norms[1].weight, norms[0].eps) if norms is not None else None
            fused.rotary_embedding(positions, q, k, self.cos, self.sin, weights)
            return q, k
        if norms is not None:
            q, k = norms[0](q), norms[1](k)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    fused = _kernels_for(x)
    if fused is not None:
        return fused.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up


class MLP(nn.Module):
    """The gated SiLU MLP, its intermediate units split across tensor-parallel ranks.

    `reduce=False` leaves the all-reduce of down_proj's partial sums to the caller (the MoE block sums its
    shared expert with the routed experts first, then reduces once).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TPGroup, reduce: bool = True,
                 linear: Callable[..., nn.Module] = nn.Linear) -> None:
        super().__init__()
        self.tp, self.reduce = tp, reduce
        inter = intermediate_size // tp.size
        self.gate_up_proj = linear(hidden_size, 2 * inter, bias=False)
        self.down_proj = linear(inter, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return self.tp.all_reduce(out) if self.reduce else out
