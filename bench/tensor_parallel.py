"""Tensor parallelism: throughput and batch-1 latency at a given TP size, or TP=2 against TP=1 parity.

Each configuration runs in its own process (`python -m bench.tensor_parallel --tp 2 --shape llama-3.1-8b`),
so one engine's memory never shadows the next. Floors count every GPU's bandwidth and peak (communication
is not in the floor). `--parity` compares greedy TP=2 and TP=1 outputs on 8 prompts x 32 tokens.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import random
from typing import Any

import torch
from kvpilot.engine import SamplingParams

from bench.common import provenance, write_result
from bench.engine_common import SHAPES, make_llm, measured_device
from bench.floors import Device, decode_step_floor_s
from bench.latency import decode_ms_per_step
from bench.throughput import measure_workload, nano_vllm_workload, random_fixed_workload

SHAPES.setdefault("llama-3.1-70b", SHAPES["llama-3.1-8b"].parent / "llama-3.1-70b")


def measure(shape: str, tp: int, workloads: list[str], eager: bool) -> dict[str, Any]:
    """One engine for every workload: on CUDA a process forms one tensor-parallel group."""
    one, ceilings = measured_device()
    dev = Device(one.bandwidth_Bps * tp, one.peak_flops * tp)
    result: dict[str, Any] = {
        **provenance(),
        "shape": shape,
        "tensor_parallel_size": tp,
        "cuda_graphs": not eager,
        "ceilings_per_gpu": ceilings,
    }
    llm = make_llm(shape, tensor_parallel_size=tp, max_num_batched_tokens=8192, enforce_eager=eager, max_num_seqs=512)
    if "random" in workloads:
        prompts, params = random_fixed_workload()
        result["random-256-256x1000"] = measure_workload(llm, "random-256-256x1000", shape, prompts, params, dev)
    if "nano" in workloads:
        prompts, params = nano_vllm_workload()
        result["nano-vllm"] = measure_workload(llm, "nano-vllm", shape, prompts, params, dev)
    ms = decode_ms_per_step(llm, 1)
    floor = 1000 * decode_step_floor_s(llm.core.arch, dev, 1, 168)
    fraction = round(floor / ms, 3)
    result["batch1_decode"] = {"ms_per_step": round(ms, 3), "floor_ms": round(floor, 3), "fraction": fraction}
    print(f"[{shape} TP={tp}] batch-1 decode {ms:.2f} ms/step (floor {floor:.2f})", flush=True)
    llm.core.close()
    return result


def greedy(tp: int, dtype: str, prompts: list[list[int]]) -> list[Any]:
    llm = make_llm("llama-3.1-8b", tensor_parallel_size=tp, dtype=dtype, max_num_seqs=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=0))
    llm.core.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outs]


def parity(dtype: str) -> dict[str, Any]:
    """TP=1 first (no group), then TP=2 (this process's one group): run once per dtype."""
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(rng.randint(16, 600))] for _ in range(8)]
    one, two = greedy(1, dtype, prompts), greedy(2, dtype, prompts)
    rows = []
    for a, b in zip(one, two, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y), 32)
        deltas = [abs(x.logprob - y.logprob) for x, y in zip(a.logprobs[:same], b.logprobs[:same], strict=True)]
        rows.append({"matching_tokens": same, "max_logprob_delta": round(max(deltas, default=0.0), 5)})
    result = {
        **provenance(),
        "dtype": dtype,
        "prompts": 8,
        "tokens": 32,
        "per_prompt": rows,
        "all_tokens_match": all(r["matching_tokens"] == 32 for r in rows),
    }
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--workloads", default="random")
    parser.add_argument("--parity", action="store_true")
    parser.add_argument("--dtype", default="float32", help="with --parity")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--hang-dump-s", type=float, default=0, help="print every thread's stack after this long")
    args = parser.parse_args()
    if args.hang_dump_s:
        faulthandler.dump_traceback_later(args.hang_dump_s, exit=True)
    if args.parity:
        write_result(f"tp_parity-{args.dtype}", parity(args.dtype))
        return
    result = measure(args.shape, args.tp, args.workloads.split(","), args.eager)
    write_result(f"tp-{args.shape}-tp{args.tp}{'-eager' if args.eager else ''}", result)


if __name__ == "__main__":
    main()
