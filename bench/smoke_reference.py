"""GPU smoke run of the reference (pure PyTorch) attention backend on the Llama-3.1-8B shape, dummy bf16.

Proves the whole engine path (dummy load, KV sizing from measured memory, scheduling, sampling) on a
real GPU in real shapes, and records what it measured. Speed is not the point: the reference backend
attends one sequence at a time.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from kvpilot.engine import LLM, SamplingParams

from bench.common import provenance, write_result

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(ROOT / "bench/configs/llama-3.1-8b"))
    args = parser.parse_args()

    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        load_format="dummy",
        dtype="bfloat16",
        attention_backend="torch",
        max_model_len=4096,
        max_num_batched_tokens=4096,
        enforce_eager=True,
    )
    load_s = time.perf_counter() - t0
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(128)] for _ in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    torch.cuda.synchronize()
    single_s = time.perf_counter() - t0
    finite = all(len(o.outputs[0].token_ids) == 32 for o in outs)
    stats = llm.core.stats()
    result = {
        **provenance(),
        "benchmark": "smoke_reference",
        "workload": {
            "model": "llama-3.1-8b shape, dummy bf16",
            "prompts": 8,
            "prompt_len": 128,
            "max_tokens": 32,
            "backend": "torch (reference)",
            "batch1_tokens": 64,
        },
        "load_s": round(load_s, 2),
        "kv_blocks": stats.num_total_blocks,
        "kv_tokens": stats.num_total_blocks * llm.config.block_size,
        "batch8_output_tok_s": round(8 * 32 / batch_s, 1),
        "batch1_ms_per_token_incl_prefill": round(1000 * single_s / 64, 2),
        "all_requests_completed": finite,
        "idle_blocks_free": stats.num_free_blocks == stats.num_total_blocks,
        "first_tokens": outs[0].outputs[0].token_ids[:8],
        "single_tokens": single[0].outputs[0].token_ids[:8],
    }
    print(json.dumps(result, indent=1))
    write_result("h100-smoke_reference", result)


if __name__ == "__main__":
    main()
