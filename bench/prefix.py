"""Shared-prefix workload with prefix caching on and off: 64 groups x 16 prompts, a 2,048-token system
prompt per group, a 128-token question each, 256 output tokens. Run: `python -m bench.prefix`.
"""

from __future__ import annotations

import argparse
import gc
import random
from typing import Any

import torch
from kvpilot.engine import SamplingParams

from bench.common import provenance, write_result
from bench.engine_common import make_llm, timed_generate


def shared_prefix_workload(groups: int = 64, per_group: int = 16, prefix: int = 2048, question: int = 128):
    rng = random.Random(0)
    prompts = []
    for _ in range(groups):
        system = [rng.randrange(1000, 100000) for _ in range(prefix)]
        prompts += [system + [rng.randrange(1000, 100000) for _ in range(question)] for _ in range(per_group)]
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--name", default="prefix")
    args = parser.parse_args()
    prompts = shared_prefix_workload(groups=args.groups)
    params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=256)] * len(prompts)
    results: dict[str, Any] = {
        **provenance(),
        "shape": args.shape,
        "workload": {
            "groups": args.groups,
            "per_group": 16,
            "prefix_tokens": 2048,
            "question_tokens": 128,
            "output_tokens": 256,
        },
    }
    for caching in (True, False):
        llm = make_llm(args.shape, enable_prefix_caching=caching, max_num_seqs=256, max_num_batched_tokens=16384)
        run = timed_generate(llm, prompts, params)
        stats = llm.core.stats()
        run["prefix_hit_rate"] = round(stats.prefix_cache_hits / max(1, stats.prefix_cache_queries), 3)
        results["caching_on" if caching else "caching_off"] = run
        print(f"prefix caching {caching}: {run}", flush=True)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    results["speedup"] = round(results["caching_off"]["elapsed_s"] / results["caching_on"]["elapsed_s"], 2)
    print(f"speedup with prefix caching: {results['speedup']}x", flush=True)
    write_result(args.name, results)


if __name__ == "__main__":
    main()
