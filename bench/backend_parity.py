"""Greedy outputs of the Triton backend (with CUDA graphs) against the reference backend, Llama-3.1-8B shape.

Tokens are compared for the first 32 of 8 prompts; where bf16 rounding makes them diverge, the
log-probabilities of the shared prefix must agree within a stated tolerance. Run: `python -m bench.backend_parity`.
"""

from __future__ import annotations

import argparse
import gc
import random
from typing import Any

import torch
from kvpilot.engine import SamplingParams

from bench.common import provenance, write_result
from bench.engine_common import make_llm

LOGPROB_TOLERANCE = 0.1  # nats, bf16 through 32 layers


def _run(backend: str, prompts: list[list[int]], dtype: str) -> list[Any]:
    llm = make_llm(
        "llama-3.1-8b", attention_backend=backend, enforce_eager=backend == "torch", max_num_seqs=16, dtype=dtype
    )
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=1))
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", default="backend_parity")
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(rng.randint(16, 600))] for _ in range(8)]
    result: dict[str, Any] = {**provenance(), "prompts": 8, "tokens": 32, "logprob_tolerance": LOGPROB_TOLERANCE}
    for dtype in ("float32", "bfloat16"):
        ref, fast = _run("torch", prompts, dtype), _run("triton", prompts, dtype)
        rows = []
        for r, f in zip(ref, fast, strict=True):
            same = next((i for i, (a, b) in enumerate(zip(r.token_ids, f.token_ids, strict=True)) if a != b), 32)
            deltas = [abs(a.logprob - b.logprob) for a, b in zip(r.logprobs[:same], f.logprobs[:same], strict=True)]
            rows.append({"matching_tokens": same, "max_logprob_delta": round(max(deltas, default=0.0), 5)})
        result[dtype] = {
            "per_prompt": rows,
            "all_tokens_match": all(row["matching_tokens"] == 32 for row in rows),
            "logprobs_within_tolerance": all(row["max_logprob_delta"] <= LOGPROB_TOLERANCE for row in rows),
        }
        print(dtype, result[dtype], flush=True)
    write_result(args.name, result)
    if not result["float32"]["all_tokens_match"]:
        raise SystemExit("in fp32 the triton backend must reproduce the reference tokens exactly")


if __name__ == "__main__":
    main()
