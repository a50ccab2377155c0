"""The FP8 linear layer: e4m3 weights with float32 scales per output row (and K-group), activations quantized
per token as they arrive.

weight [N, K] e4m3 and weight_scale [N, G] float32, G = ceil(K / group) (G = 1: per output channel). Per-tensor
and block scales from checkpoints are stored in this one layout (a per-tensor scale repeated down its rows, a
block scale down its block's rows), so fused q/k/v and gate/up with different scales, and tensor-parallel
shards, are row and column slices like the weight's own. The matmul (EngineConfig.fp8_gemm_backend):
- auto (on CUDA): up to 16 rows (decode) with channel scales and N <= 16,384, kernels/fp8_weight_only.py (the
  weights converted in registers, the activations not quantized); other decode rows triton; above, scaled_mm
  (triton for block scales): each where bench/fp8_gemm.py measured it fastest on an H200;
- scaled_mm: torch._scaled_mm (cuBLASLt), per-token x per-channel scales; needs G = 1;
- triton: kernels/fp8_gemm.py, any G;
- reference: dequantize both operands into one float32 matmul (kernels/fp8_math.py): the CPU path, and what
  the others are tested against.
"""

from __future__ import annotations

import os

import torch
from kvpilot.kernels.fp8_math import FP8_DTYPE, num_groups, quantize_groups
from torch import nn

GEMMS = ("auto", "scaled_mm", "triton", "reference")


def resolve_gemm(choice: str, device: torch.device, grouped: bool) -> str:
    """EngineConfig.fp8_gemm_backend for this device and scale layout; what cannot run is an error naming it."""
    if choice == "auto":
        return "auto" if device.type == "cuda" else "reference"
    if choice not in GEMMS:
        raise ValueError(f"fp8_gemm_backend {choice!r} is not one of {('auto', *GEMMS)}")
    if choice == "scaled_mm" and (device.type != "cuda" or grouped):
        raise ValueError("fp8_gemm_backend 'scaled_mm' needs CUDA and one weight scale per output channel "
                         f"(this model: {device.type}, {'block/group' if grouped else 'channel'} scales)")
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("fp8_gemm_backend 'triton' needs CUDA (or TRITON_INTERPRET=1 for tests)")
    return choice


class Fp8Linear(nn.Module):
    """y = x @ W.T (+ b) with W in e4m3: nn.Linear's signature, plus the K-group and the matmul to use."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, group: int | None = None,
                 gemm: str = "reference") -> None:
        super().__init__()
        if gemm not in GEMMS:
            raise ValueError(f"unknown FP8 gemm {gemm!r}")
        self.in_features, self.out_features = in_features, out_features
        self.group = group if group is not None and group < in_features else None
        self.gemm = gemm
        groups = 1 if self.group is None else num_groups(in_features, self.group)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, groups, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def group_k(self) -> int:
        return self.group or self.in_features

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_k}, gemm={self.gemm}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        gemm = self.gemm
        if gemm == "auto":
            from kvpilot.kernels.fp8_weight_only import MAX_N, MAX_ROWS, fp8_weight_only_gemm

            few = rows.shape[0] <= MAX_ROWS
            if few and self.group is None and self.out_features <= MAX_N:
                out = fp8_weight_only_gemm(rows.contiguous(), self.weight, self.weight_scale, self.group_k, self.bias)
                return out.view(*x.shape[:-1], self.out_features)
            gemm = "triton" if self.group or few else "scaled_mm"
        if gemm == "reference":
            out = self._reference(rows)
        elif gemm == "triton":
            out = self._triton(rows)
        else:
            out = self._scaled_mm(rows)
        return out.view(*x.shape[:-1], self.out_features)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        from kvpilot.kernels.fp8_gemm import fp8_gemm_ref

        x_q, x_s = quantize_groups(x, self.group_k)
        return fp8_gemm_ref(x_q, x_s, self.weight, self.weight_scale, self.group_k, x.dtype, self.bias)

    def _triton(self, x: torch.Tensor) -> torch.Tensor:
        from kvpilot.kernels.fp8_gemm import fp8_gemm
        from kvpilot.kernels.fp8_quant import quantize_rows

        x_q, x_s = quantize_rows(x.contiguous(), self.group)
        return fp8_gemm(x_q, x_s, self.weight, self.weight_scale, self.group_k, x.dtype, self.bias)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        from kvpilot.kernels.fp8_quant import quantize_rows

        x_q, x_s = quantize_rows(x.contiguous())
        # Row-wise scaling writes bfloat16 (the type cuBLASLt supports for it); other model dtypes cast after.
        out = torch._scaled_mm(x_q, self.weight.t(), scale_a=x_s, scale_b=self.weight_scale.view(1, -1),
                               out_dtype=torch.bfloat16)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

