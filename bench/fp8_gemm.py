"""FP8 GEMM choice per shape (issue 14): torch._scaled_mm vs the Triton FP8 GEMM vs the bf16 matmul they replace.

Run on a CUDA machine (compute capability >= 8.9) from the repository root: `python bench/fp8_gemm.py`. Every
kernel is first checked against its reference (kernel_checks, FP8 cases included); nothing is timed if one
disagrees. Times the Llama-3.1-8B projections (fused qkv, o, fused gate/up, down) at decode and prefill token
counts, per-channel scales (scaled_mm and Triton) and 128x128 block scales (Triton only), activation
quantization included, as Fp8Linear runs them. Writes bench/results/fp8-gemm.json with provenance; the
`fastest` column is what EngineConfig.fp8_gemm_backend's `auto` should pick per shape. Not yet run: the GPU
budget of the session that wrote it was spent.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_ms, ensure_kvpilot_importable, provenance, write_result

ensure_kvpilot_importable()
from kernel_checks import run_checks  # noqa: E402
from kvpilot.engine.quant.fp8_linear import Fp8Linear  # noqa: E402
from kvpilot.kernels.fp8_math import quantize_groups  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TOKENS = (1, 16, 64, 256, 1024, 4096)


def _layer(n: int, k: int, group: int | None, gemm: str) -> Fp8Linear:
    layer = Fp8Linear(k, n, group=group, gemm=gemm).cuda()
    w, s = quantize_groups(torch.randn(n, k, device="cuda") * 0.02, group or k)
    layer.weight.copy_(w)
    layer.weight_scale.copy_(s)
    return layer


def _row(name: str, n: int, k: int, m: int) -> dict[str, Any]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    layers = {"scaled_mm_channel_ms": _layer(n, k, None, "scaled_mm"),
              "triton_channel_ms": _layer(n, k, None, "triton"), "triton_block128_ms": _layer(n, k, 128, "triton")}
    times = {"bf16_matmul_ms": bench_ms(lambda: x @ w16.T)}
    for key, layer in layers.items():
        times[key] = bench_ms(lambda layer=layer: layer(x))
    channel = {"scaled_mm": times["scaled_mm_channel_ms"], "triton": times["triton_channel_ms"]}
    fastest = min(channel, key=lambda g: channel[g])
    return {"shape": name, "n": n, "k": k, "m": m, **{key: round(v, 4) for key, v in times.items()},
            "fastest_channel": fastest, "speedup_vs_bf16": round(times["bf16_matmul_ms"] / channel[fastest], 3)}


def main() -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        print("needs a CUDA GPU with FP8 (compute capability >= 8.9)", file=sys.stderr)
        return 2
    checks = run_checks()
    failed = [c for c in checks if not c["ok"]]
    payload: dict[str, Any] = {**provenance(), "checks": checks, "rows": []}
    if not failed:
        for name, (n, k) in SHAPES.items():
            for m in TOKENS:
                payload["rows"].append(_row(name, n, k, m))
                print(payload["rows"][-1], flush=True)
    write_result("fp8-gemm", payload)
    for c in failed:
        print("FAILED", c, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
