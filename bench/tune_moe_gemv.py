"""Tune the few-token MoE kernels' tiles (kernels/moe_gemv.py) for one model shape and write their table.

Run on the GPU the table is for, from the repository root:
    python bench/tune_moe_gemv.py --shape qwen3-30b-a3b [--tp 1] [--budget-s 120]
Each candidate tile of the gate/up kernel (the down kernel on its default), then of the down kernel (gate/up
on the best found), is checked against the PyTorch reference and timed inside one CUDA graph of 20 calls at
the largest batch the path takes; every call routes to other experts, so the weights come from HBM as in a
decode step and not from L2. The best pair is then timed at 1 token too. The table goes to
`gemv,<name>` in $KVPILOT_FUSED_MOE_CONFIGS (else kernels/fused_moe_configs/) and to $OUT; the sweep, every
tile's time included, to bench/results/tune-moe-gemv-<shape>-tp<tp>.json. A budget that ends the sweep early
writes the sweep only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_kvpilot_importable, graph_ms, provenance, write_result

ensure_kvpilot_importable()
from kvpilot.engine.models.arch import load_arch  # noqa: E402
from kvpilot.kernels.fused_moe import fused_experts_ref, route  # noqa: E402
from kvpilot.kernels.fused_moe_config import (  # noqa: E402
    DEFAULT_GEMV,
    GemvConfig,
    device_name,
    table_name,
    table_path,
    uses_gemv,
)
from kvpilot.kernels.moe_gemv import experts_gemv  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
CALLS = 20
SPACE = [GemvConfig(n, k, w) for n, k, w in itertools.product([8, 16, 32, 64], [128, 256, 512], [2, 4, 8])]


def _inputs(tokens: int, arch: Any, tp: int) -> dict[str, Any]:
    hidden, experts, top_k = arch.hidden_size, arch.num_experts, arch.num_experts_per_tok
    inter = arch.moe_intermediate_size // tp
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    routes = [route(torch.randn(tokens, experts, device="cuda", generator=gen), top_k, arch.norm_topk_prob)
              for _ in range(CALLS)]  # fmt: skip
    return {
        "x": torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16(),
        "w13": (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden**-0.5).bfloat16(),
        "w2": (torch.randn(experts, hidden, inter, device="cuda", generator=gen) * inter**-0.5).bfloat16(),
        "routes": routes,
    }


def time_tiles(inp: dict[str, Any], tiles: dict[str, GemvConfig]) -> dict[str, Any]:
    x, w13, w2, routes = inp["x"], inp["w13"], inp["w2"], inp["routes"]
    weights, ids = routes[0]
    ref = fused_experts_ref(x, w13, w2, weights, ids).float()
    out = experts_gemv(x, w13, w2, weights, ids, tiles).float()
    err = ((out - ref).norm() / ref.norm()).item()
    if not err <= 1e-2:
        return {"rel_err": err}
    it = itertools.cycle(routes)

    def call() -> torch.Tensor:
        w, i = next(it)
        return experts_gemv(x, w13, w2, w, i, tiles)

    return {"rel_err": err, "ms": graph_ms(call, calls=CALLS)}


def sweep_kernel(kernel: str, fixed: dict[str, GemvConfig], inp: dict[str, Any], deadline: float) -> list[dict]:
    rows = []
    for cfg in SPACE:
        if time.monotonic() > deadline:
            break
        tiles = {**fixed, kernel: cfg}
        try:
            rows.append({"kernel": kernel, "config": cfg.to_json(), **time_tiles(inp, tiles)})
        except Exception as exc:  # registers or shared memory the device refuses
            rows.append({"kernel": kernel, "config": cfg.to_json(), "error": f"{type(exc).__name__}: {exc}"[:160]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=120.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/tune_moe_gemv.py needs the CUDA device the table is for", file=sys.stderr)
        return 2
    arch = load_arch(CONFIGS / args.shape)
    experts, top_k = arch.num_experts, arch.num_experts_per_tok
    most = max((t for t in range(1, 65) if uses_gemv(t, top_k, experts)), default=0)
    if not most:
        print(f"{args.shape}: no batch takes the few-token path (top-{top_k} of {experts})", file=sys.stderr)
        return 2
    inter = arch.moe_intermediate_size // args.tp
    name = "gemv," + table_name(experts, inter, device_name(torch.device("cuda")), torch.bfloat16)
    deadline = time.monotonic() + args.budget_s
    inp = _inputs(most, arch, args.tp)
    sweep: dict[str, Any] = {"benchmark": "tune_moe_gemv", **provenance(), "shape": args.shape, "tp": args.tp,
                             "table": name, "tokens": most, "calls_per_graph": CALLS, "budget_s": args.budget_s,
                             "default": {k: v.to_json() for k, v in DEFAULT_GEMV.items()},
                             "default_ms": time_tiles(inp, DEFAULT_GEMV).get("ms")}  # fmt: skip
    best = dict(DEFAULT_GEMV)
    for kernel in ("gate_up", "down"):
        rows = sweep_kernel(kernel, best, inp, deadline)
        sweep[f"{kernel}_rows"] = rows
        timed = [r for r in rows if "ms" in r]
        if timed:
            best[kernel] = GemvConfig(**min(timed, key=lambda r: r["ms"])["config"])
        print(f"{kernel}: {len(timed)}/{len(SPACE)} timed, best {best[kernel]}", flush=True)
        write_result(f"tune-moe-gemv-{args.shape}-tp{args.tp}", sweep)
    sweep["best"] = {k: v.to_json() for k, v in best.items()}
    sweep["best_ms"] = time_tiles(inp, best).get("ms")
    one_token = _inputs(1, arch, args.tp)
    sweep["best_ms_1_token"] = time_tiles(one_token, best).get("ms")
    sweep["default_ms_1_token"] = time_tiles(one_token, DEFAULT_GEMV).get("ms")
    complete = all(len(sweep[f"{k}_rows"]) == len(SPACE) for k in ("gate_up", "down"))
    sweep["complete"] = complete
    print(f"T{most}: default {sweep['default_ms']} ms, best {sweep['best_ms']} ms; T1: default "
          f"{sweep['default_ms_1_token']}, best {sweep['best_ms_1_token']}", flush=True)  # fmt: skip
    write_result(f"tune-moe-gemv-{args.shape}-tp{args.tp}", sweep)
    if not complete:
        print("the budget ended the sweep early: no table written", file=sys.stderr)
        return 1
    targets = [table_path(name)] + ([Path(os.environ["OUT"]) / name] if os.environ.get("OUT") else [])
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sweep["best"], indent=2) + "\n")
    print("wrote", *targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
