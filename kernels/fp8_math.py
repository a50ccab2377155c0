"""FP8 (e4m3) quantization in plain PyTorch: the one definition every FP8 kernel and the CPU path agree on.

A quantized tensor is e4m3 values and float32 scales, `x ~= q * scale`, with the scale chosen so the largest
magnitude in its group maps to e4m3's largest finite value (448) and everything is clamped to +-448 (e4m3fn
has no infinity: an unclamped overflow would be NaN on some devices). Groups run along the last dimension:
a row of `group` elements shares one scale (`group` = the row length: per token or per output channel).
No Triton here, so the engine's CPU path imports it on any machine.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# An all-zero group still gets a positive scale, so dividing by it is safe and its values stay 0.
MIN_AMAX = 1e-12


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


def num_groups(length: int, group: int) -> int:
    return -(-length // group)


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, clamped to e4m3's range and rounded to nearest (scale broadcasts against x)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def expand_groups(scales: torch.Tensor, group: int, length: int) -> torch.Tensor:
    """[..., G] group scales -> [..., length] per-element scales (the last group may be partial)."""
    return scales.repeat_interleave(group, dim=-1)[..., :length]


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> (e4m3 [..., K], float32 scales [..., ceil(K / group)]): one scale per `group` elements."""
    k = x.shape[-1]
    g = num_groups(k, group)
    pad = g * group - k
    xf = x.float()
    padded = torch.nn.functional.pad(xf, (0, pad)) if pad else xf
    amax = padded.unflatten(-1, (g, group)).abs().amax(dim=-1)
    scales = amax.clamp_min(MIN_AMAX) / FP8_MAX
    return to_fp8(xf, expand_groups(scales, group, k)), scales


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of quantize_groups, in `dtype`: e4m3 values are exact in every float type, then scaled."""
    return (q.float() * expand_groups(scales, group, q.shape[-1])).to(dtype)


def quantize_heads(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """K or V rows [T, H, D] with one scale per head [H] -> e4m3 [T, H, D] (the KV cache's layout)."""
    return to_fp8(x, scale.view(1, -1, 1))


def dequantize_heads(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 [..., H, D] and per-head scales [H] -> `dtype` values."""
    return (q.float() * scale.view(-1, 1)).to(dtype)
