"""Fused MoE kernel benchmark: one MoE layer's experts at 1 to 4,096 tokens against its physical floor.

Run on a CUDA machine from the repository root: `python bench/fused_moe.py [--shape qwen3-30b-a3b] [--tp 1]`.
For each token count it routes random router logits (softmax, top-k, the shape's renormalisation), checks the
kernels against the PyTorch reference, captures the whole call (routing's block sort included) in a CUDA graph
and checks the replay gives the same output (the graph-safety the engine's captured steps rely on), then times
the eager call and the replay. Batches on the few-token path (moe_gemv.py) also time the sorted path on the
same inputs, and the routing and the block sort alone are each timed both ways (one launch, and the PyTorch
ops: the sort's kernel also above the pair count where the engine hands it to the PyTorch ops). The floor is the
larger of the bytes that must move (every expert the batch touches, read once, plus the activations) at the
measured copy bandwidth and the matmul flops at the measured bf16 peak; the fraction of it reached is the
figure issue 15 asks for. vLLM's fused_experts, when importable
(PYTHONPATH=/tmp/vsite, ../shared/peers/README.md), is timed on the same inputs. Writes
bench/results/fused-moe-<shape>.json with provenance, ceilings, the tile config used and every figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    bench_ms,
    ensure_kvpilot_importable,
    graph_ms,
    measure_bf16_matmul_tflops,
    measure_hbm_bandwidth,
    provenance,
    write_result,
)

ensure_kvpilot_importable()
from kvpilot.engine.models.arch import load_arch  # noqa: E402
from kvpilot.kernels.fused_moe import fused_experts, fused_experts_ref, route, route_fused  # noqa: E402
from kvpilot.kernels.fused_moe_config import (  # noqa: E402
    device_name,
    gemv_configs,
    get_config,
    load_table,
    table_name,
    uses_gemv,
)
from kvpilot.kernels.moe_align import (  # noqa: E402
    KERNEL_MAX_PAIRS,
    align_block_size_kernel,
    align_block_size_ref,
)

CONFIGS = Path(__file__).resolve().parent / "configs"
TOKENS = (1, 2, 4, 8, 16, 64, 4096)


def _vllm_experts() -> Any | None:
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts as vllm_fused_experts
    except Exception:  # vLLM absent, or present but unable to import here: time kvpilot alone
        return None
    return vllm_fused_experts


def _floor(tokens: int, touched: int, top_k: int, inter: int, hidden: int, ceilings: dict[str, float]) -> dict:
    weight_bytes = touched * 3 * inter * hidden * 2
    act_bytes = 2 * (2 * tokens * hidden + 2 * tokens * top_k * inter + 2 * tokens * top_k * hidden)
    flops = 2 * tokens * top_k * 3 * inter * hidden
    memory_ms = (weight_bytes + act_bytes) / (ceilings["copy_tbps"] * 1e9)
    compute_ms = flops / (ceilings["bf16_matmul_tflops"] * 1e9)
    return {"experts_touched": touched, "bytes": weight_bytes + act_bytes, "flops": flops, "memory_ms": memory_ms,
            "compute_ms": compute_ms, "floor_ms": max(memory_ms, compute_ms),
            "bound": "memory" if memory_ms >= compute_ms else "compute"}  # fmt: skip


def _graph_replay(fn: Any) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    fn()  # compile and settle allocations outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


def bench_tokens(tokens: int, arch: Any, tp: int, ceilings: dict[str, float], vllm: Any) -> dict[str, Any]:
    hidden, experts, top_k = arch.hidden_size, arch.num_experts, arch.num_experts_per_tok
    inter = arch.moe_intermediate_size // tp
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
    w13 = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden**-0.5).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, device="cuda", generator=gen) * inter**-0.5).bfloat16()
    gate = torch.randn(experts, hidden, device="cuda", dtype=torch.bfloat16, generator=gen) * hidden**-0.5

    def call() -> torch.Tensor:
        weights, ids = route_fused(x @ gate.t(), top_k, arch.norm_topk_prob)
        return fused_experts(x, w13, w2, weights, ids)

    logits = x @ gate.t()
    weights, ids = route(logits, top_k, arch.norm_topk_prob)
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    eager = call()
    rel = ((eager.float() - ref.float()).norm() / ref.float().norm()).item()
    graph, graph_out = _graph_replay(call)
    gemv = uses_gemv(tokens, top_k, experts)
    cfg = get_config(tokens, experts, inter, x.dtype, x.device)
    result: dict[str, Any] = {
        "tokens": tokens,
        "path": "gemv" if gemv else "sorted",
        "config": ({k: v.to_json() for k, v in gemv_configs(experts, inter, x.dtype, x.device).items()} if gemv
                   else cfg.to_json()),
        "route_fused_ms": graph_ms(lambda: route_fused(logits, top_k, arch.norm_topk_prob)),
        "route_torch_ms": graph_ms(lambda: route(logits, top_k, arch.norm_topk_prob)),
        "align_block_m": cfg.BLOCK_SIZE_M,
        "align_kernel_ms": graph_ms(lambda: align_block_size_kernel(ids, cfg.BLOCK_SIZE_M, experts)),
        "align_torch_ms": graph_ms(lambda: align_block_size_ref(ids, cfg.BLOCK_SIZE_M, experts)),
        "align_engine_path": "kernel" if tokens * top_k <= KERNEL_MAX_PAIRS else "torch",
        "rel_err_vs_reference": rel,
        "graph_replay_equals_eager": bool(torch.equal(graph_out, eager)),
        "eager_ms": bench_ms(call),
        "graph_ms": bench_ms(graph.replay),
        "experts_only_ms": bench_ms(lambda: fused_experts(x, w13, w2, weights, ids)),
        **_floor(tokens, int(ids.unique().numel()), top_k, inter, hidden, ceilings),
    }
    if gemv:  # the same inputs through the sorted path, for the crossover
        result["sorted_experts_only_graph_ms"] = graph_ms(lambda: fused_experts(x, w13, w2, weights, ids, cfg))
        result["gemv_experts_only_graph_ms"] = graph_ms(lambda: fused_experts(x, w13, w2, weights, ids))
    result["fraction_of_floor_graph"] = result["floor_ms"] / result["graph_ms"]
    result["fraction_of_floor_experts_only"] = result["floor_ms"] / result["experts_only_ms"]
    if vllm is not None:
        try:
            result["vllm_experts_ms"] = bench_ms(lambda: vllm(x, w13, w2, weights, ids.to(torch.int32)))
        except Exception as exc:  # its signature or config lookup changed: record why, keep ours
            result["vllm_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    print(f"T{tokens}: {result['graph_ms']:.4f} ms graph, floor {result['floor_ms']:.4f} ms ({result['bound']}), "
          f"{result['fraction_of_floor_graph']:.2f} of floor, err {rel:.1e}", flush=True)  # fmt: skip
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-30b-a3b", help="a folder of bench/configs")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size: experts' units per rank")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/fused_moe.py needs a CUDA device", file=sys.stderr)
        return 2
    arch = load_arch(CONFIGS / args.shape)
    if not arch.num_experts:
        print(f"{args.shape} has no experts", file=sys.stderr)
        return 2
    ceilings = {**measure_hbm_bandwidth(), "bf16_matmul_tflops": measure_bf16_matmul_tflops()}
    print("ceilings", ceilings, flush=True)
    inter = arch.moe_intermediate_size // args.tp
    table = table_name(arch.num_experts, inter, device_name(torch.device("cuda")), torch.bfloat16)
    payload: dict[str, Any] = {
        "benchmark": "fused_moe", **provenance(), "shape": args.shape, "tp": args.tp,
        "experts": arch.num_experts, "top_k": arch.num_experts_per_tok, "intermediate_per_rank": inter,
        "hidden": arch.hidden_size, "dtype": "bfloat16", "ceilings": ceilings,
        "config_table": table if load_table(table) is not None else None, "runs": [],
    }  # fmt: skip
    vllm = _vllm_experts()
    payload["vllm_compared"] = vllm is not None
    for tokens in TOKENS:
        payload["runs"].append(bench_tokens(tokens, arch, args.tp, ceilings, vllm))
        write_result(f"fused-moe-{args.shape}", payload)
    ok = all(r["rel_err_vs_reference"] <= 1e-2 and r["graph_replay_equals_eager"] for r in payload["runs"])
    print("wrote", *write_result(f"fused-moe-{args.shape}", payload))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
