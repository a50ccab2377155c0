"""FP8 GEMM choice per shape (issue 14): the weight-only kernel, torch._scaled_mm and the Triton FP8 GEMM against
the bf16 matmul they replace.

Run on a CUDA machine (compute capability >= 8.9) from the repository root: `python bench/fp8_gemm.py`. The
FP8 kernels are first checked against their references (bench/fp8_kernel_checks.py); nothing is timed if one
disagrees. Times the Llama-3.1-8B projections (fused qkv, o, fused gate/up, down) at decode and prefill token
counts, activation quantization included, as Fp8Linear runs them: per-channel scales (weight-only, scaled_mm,
Triton) and 128x128 block scales (weight-only, Triton). Every figure is the GPU's time inside a CUDA graph,
as the engine's captured steps run, over enough copies of the weight that L2 never holds it (each decode
layer reads weights it has not read since the last step). Then sweeps the weight-only kernel's tiles at one
row. Writes bench/results/fp8-gemm.json with provenance; `fastest_channel` is what Fp8Linear's `auto`
should take per shape and row count.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_kvpilot_importable, graph_ms, provenance, write_result

ensure_kvpilot_importable()
from kernel_checks import family_of, run_checks  # noqa: E402
from kvpilot.engine.quant.fp8_linear import Fp8Linear  # noqa: E402
from kvpilot.kernels.fp8_math import quantize_groups  # noqa: E402
from kvpilot.kernels.fp8_weight_only import fp8_weight_only_gemm, tiles  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TOKENS = (1, 16, 64, 256, 1024, 4096)
SWEEP = [(bn, bk, 4, 4) for bn in (16, 32, 64) for bk in (128, 256, 512)] + [(32, 256, 8, 4), (64, 256, 8, 3)]
COLD_BYTES = 200 * 2**20  # more than the H200's 50 MiB L2, four times over


def _copies(weight_bytes: int) -> int:
    return max(1, min(8, -(-COLD_BYTES // weight_bytes)))


def _cycling(fns: list[Any]) -> Any:
    """One call per captured call, each on the next copy."""
    state = {"i": 0}

    def call() -> None:
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return call


def _layers(n: int, k: int, group: int | None, gemm: str, copies: int) -> list[Fp8Linear]:
    out = []
    for _ in range(copies):
        layer = Fp8Linear(k, n, group=group, gemm=gemm).cuda()
        w, s = quantize_groups(torch.randn(n, k, device="cuda") * 0.02, group or k)
        layer.weight.copy_(w)
        layer.weight_scale.copy_(s)
        out.append(layer)
    return out


def _row(name: str, n: int, k: int, m: int) -> dict[str, Any]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(_copies(2 * n * k))]
    fp8 = _copies(n * k)
    variants = {"scaled_mm_channel_ms": _layers(n, k, None, "scaled_mm", fp8),
                "triton_channel_ms": _layers(n, k, None, "triton", fp8),
                "triton_block128_ms": _layers(n, k, 128, "triton", fp8)}
    if m <= 16:
        variants["weight_only_channel_ms"] = _layers(n, k, None, "auto", fp8)
        variants["weight_only_block128_ms"] = _layers(n, k, 128, "auto", fp8)
    times = {"bf16_matmul_ms": graph_ms(_cycling([lambda w=w: x @ w.T for w in w16]))}
    for key, layers in variants.items():
        times[key] = graph_ms(_cycling([lambda layer=layer: layer(x) for layer in layers]))
    channel = {g: times[f"{g}_channel_ms"] for g in ("weight_only", "scaled_mm", "triton")
               if f"{g}_channel_ms" in times}
    fastest = min(channel, key=lambda g: channel[g])
    floor_ms = n * k / 4.8e9  # e4m3 weight bytes at the H200's 4.8 TB/s
    return {"shape": name, "n": n, "k": k, "m": m, **{key: round(v, 4) for key, v in times.items()},
            "fp8_weight_read_floor_ms": round(floor_ms, 4), "fastest_channel": fastest,
            "speedup_vs_bf16": round(times["bf16_matmul_ms"] / channel[fastest], 3)}


def _sweep(name: str, n: int, k: int, m: int) -> dict[str, Any]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    layers = _layers(n, k, None, "auto", _copies(n * k))
    rows = []
    for cfg in SWEEP:
        fns = [lambda layer=layer, cfg=cfg: fp8_weight_only_gemm(x, layer.weight, layer.weight_scale, k, None, cfg)
               for layer in layers]
        rows.append({"config": cfg, "ms": round(graph_ms(_cycling(fns)), 4)})
    best = min(rows, key=lambda r: r["ms"])
    chosen = tiles(k, False)
    return {"shape": name, "n": n, "k": k, "m": m, "best": best, "heuristic": chosen,
            "heuristic_ms": next((r["ms"] for r in rows if tuple(r["config"]) == chosen), None), "configs": rows}


def main() -> int:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        print("needs a CUDA GPU with FP8 (compute capability >= 8.9)", file=sys.stderr)
        return 2
    checks = run_checks(lambda kernel, case: family_of(kernel, case) == "fp8")
    failed = [c for c in checks if not c["ok"]]
    payload: dict[str, Any] = {**provenance(), "checks": checks, "rows": [], "weight_only_sweep": []}
    if not failed:
        for name, (n, k) in SHAPES.items():
            for m in TOKENS:
                payload["rows"].append(_row(name, n, k, m))
                print(payload["rows"][-1], flush=True)
        for name, (n, k) in SHAPES.items():
            sweep = _sweep(name, n, k, 1)
            payload["weight_only_sweep"].append(sweep)
            print("sweep", name, "best", sweep["best"], "heuristic", sweep["heuristic"], sweep["heuristic_ms"],
                  flush=True)
    write_result("fp8-gemm", payload)
    for c in failed:
        print("FAILED", c, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
