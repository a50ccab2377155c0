"""Tune the fused MoE kernels' tiles per token count for one model shape and write the table the engine reads.

Run on the GPU the table is for, from the repository root:
    python bench/tune_fused_moe.py --shape qwen3-30b-a3b [--tp 1] [--tokens 1,2,4,...] [--budget-s 500]
For each token count it times every candidate config (a pruned version of vLLM's search space: block sizes,
grouping, warps and stages) on random routing, drops configs whose output differs from the reference or that the
device rejects, and keeps the fastest. Each config is timed inside a CUDA graph, as the engine runs it (timed
eagerly, a batch of a few dozen tokens measures its launches, not its tiles). Token counts the few-token path takes
(kernels/moe_gemv.py) never read this table and are skipped. The table goes to <name>.json in
$KVPILOT_FUSED_MOE_CONFIGS (else kernels/fused_moe_configs/) (name and format: kernels/fused_moe_config.py) and to
$OUT; the sweep itself, every config's time included, to bench/results/tune-fused-moe-<shape>-tp<tp>.json. The
budget stops the sweep early and writes what was measured, so a device call never ends with nothing; but a table
that misses token counts goes to bench/results/partial-<name> only, never to kernels/fused_moe_configs/: the engine
would give every count not reached the nearest tuned one's tiles (one token's tiles for a 4,096-token prefill, say).
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
from common import RESULTS, ensure_kvpilot_importable, graph_ms, provenance, write_result

ensure_kvpilot_importable()
from kvpilot.engine.models.arch import load_arch  # noqa: E402
from kvpilot.kernels.fused_moe import fused_experts, fused_experts_ref, route  # noqa: E402
from kvpilot.kernels.fused_moe_config import (  # noqa: E402
    MoEConfig,
    device_name,
    table_name,
    table_path,
    uses_gemv,
)

CONFIGS = Path(__file__).resolve().parent / "configs"
TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 8192)


def candidates(tokens: int) -> list[MoEConfig]:
    """A pruned version of vLLM's space, best bets first so a spent budget cuts the long tail.

    Small batches leave few tokens per expert: small M tiles, no grouping (it only helps weight reuse in L2
    across many row blocks). Compiled kernels are shared by every token count (none is specialised on), so
    only the first token count of each kind pays the compile time.
    """
    small = tokens <= 64
    space = itertools.product([16, 32, 64] if small else [64, 128, 32, 16], [64, 128, 256], [64, 128],
                              [1] if small else [1, 16], [4, 8], [3, 4])  # fmt: skip
    return [MoEConfig(m, n, k, g, w, s) for m, n, k, g, w, s in space]


def tune_tokens(tokens: int, arch: Any, tp: int, deadline: float) -> dict[str, Any]:
    hidden, experts, top_k = arch.hidden_size, arch.num_experts, arch.num_experts_per_tok
    inter = arch.moe_intermediate_size // tp
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden**-0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=gen) * inter**-0.5).bfloat16()
    weights, ids = route(torch.randn(tokens, experts, device="cuda", generator=gen), top_k, arch.norm_topk_prob)
    ref = fused_experts_ref(x, w13, w2, weights, ids).float()
    rows: list[dict[str, Any]] = []
    for cfg in candidates(tokens):
        if time.monotonic() > deadline:
            break
        try:
            out = fused_experts(x, w13, w2, weights, ids, cfg).float()
            err = ((out - ref).norm() / ref.norm()).item()
            if not err <= 1e-2:
                rows.append({"config": cfg.to_json(), "rel_err": err})
                continue
            rows.append({"config": cfg.to_json(), "rel_err": err,
                         "ms": graph_ms(lambda cfg=cfg: fused_experts(x, w13, w2, weights, ids, cfg), 10, 10)})
        except Exception as exc:  # too much shared memory, too many registers: the device says no
            rows.append({"config": cfg.to_json(), "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
    timed = [r for r in rows if "ms" in r]
    best = min(timed, key=lambda r: r["ms"]) if timed else None
    tried = len(candidates(tokens))
    print(f"T{tokens}: {len(timed)}/{tried} timed, best {best['ms'] if best else None} ms {best and best['config']}",
          flush=True)  # fmt: skip
    return {"tokens": tokens, "candidates": tried, "rows": rows, "best": best}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--budget-s", type=float, default=float(os.environ.get("KVPILOT_TUNE_BUDGET_S", "500")))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/tune_fused_moe.py needs the CUDA device the table is for", file=sys.stderr)
        return 2
    arch = load_arch(CONFIGS / args.shape)
    inter = arch.moe_intermediate_size // args.tp
    name = table_name(arch.num_experts, inter, device_name(torch.device("cuda")), torch.bfloat16)
    deadline = time.monotonic() + args.budget_s
    sweep: dict[str, Any] = {"benchmark": "tune_fused_moe", **provenance(), "shape": args.shape, "tp": args.tp,
                             "table": name, "budget_s": args.budget_s, "runs": []}  # fmt: skip
    table: dict[str, dict[str, int]] = {}
    counts = [int(t) for t in args.tokens.split(",")]
    few = [t for t in counts if uses_gemv(t, arch.num_experts_per_tok, arch.num_experts)]
    sweep["few_token_path"] = few  # those batches never read this table: not timed
    for tokens in (t for t in counts if t not in few):
        if time.monotonic() > deadline:
            sweep.setdefault("not_reached", []).append(tokens)
            continue
        run = tune_tokens(tokens, arch, args.tp, deadline)
        sweep["runs"].append(run)
        if run["best"] is not None:
            table[str(tokens)] = run["best"]["config"]
        write_result(f"tune-fused-moe-{args.shape}-tp{args.tp}", sweep)
    if not table:
        print("no config was timed: no table written", file=sys.stderr)
        return 1
    text = json.dumps(table, indent=2) + "\n"
    if sweep.get("not_reached"):
        name = f"partial-{name}"
        targets = [RESULTS / name]
        print(f"the budget ended before token counts {sweep['not_reached']}: the partial table is not installed "
              f"in {table_path(name).parent}", file=sys.stderr)
    else:
        targets = [table_path(name)]
    targets += [Path(os.environ["OUT"]) / name] if os.environ.get("OUT") else []
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print("wrote", *targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
