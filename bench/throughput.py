"""Offline throughput: the nano-vllm workload, random 256/256 x 1000, and W-fixed256 beside Hugging Face.

Run from the repo root: `python -m bench.throughput [--shape llama-3.1-8b] [--workloads nano,random,wfixed]
[--with-hf]`. Each workload prints its figure beside the floor computed from bandwidth and peak
measured in the same run, and the whole run is written to bench/results/.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from typing import Any

import torch
from kvpilot.engine import SamplingParams

from bench.common import provenance, write_result
from bench.engine_common import SHAPES, make_llm, measured_device, timed_generate
from bench.floors import Device, workload_floor_s

NANO_FINGERPRINT = (142_827, 133_966)


def nano_vllm_workload() -> tuple[list[list[int]], list[SamplingParams]]:
    """Exactly nano-vllm's bench.py: all prompts drawn first, then the output lengths."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(100, 1024)) for _ in range(256)
    ]
    got = (sum(map(len, prompts)), sum(p.max_tokens for p in params))
    assert got == NANO_FINGERPRINT, f"nano-vllm workload fingerprint {got} != {NANO_FINGERPRINT}"
    return prompts, params


def random_fixed_workload(n: int = 1000, length: int = 256) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(length)] for _ in range(n)]
    return prompts, [SamplingParams(temperature=1.0, ignore_eos=True, max_tokens=length)] * n


def wfixed256_prompts() -> list[list[int]]:
    rng = random.Random(0)
    prompts = []
    for _ in range(256):
        n = rng.randint(100, 1024)
        prompts.append([rng.randrange(1000, 100000) for _ in range(n)])
    return prompts


def hf_baselines(shape: str, prompts: list[list[int]], batch: int = 64) -> dict[str, Any]:
    """Hugging Face generate() with static batching at `batch` (left padding), greedy, 256 new tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(SHAPES[shape])
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    start = time.perf_counter()
    generated = 0
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device="cuda")
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=256, min_new_tokens=256, do_sample=False, pad_token_id=0
            )
        generated += (out.shape[1] - width) * len(chunk)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "impl": f"HF generate static batch {batch}",
        "gen_tokens": generated,
        "s": round(elapsed, 2),
        "out_tok_s": round(generated / elapsed, 1),
    }


def measure_workload(
    llm: Any, name: str, shape: str, prompts: list[list[int]], params: list[SamplingParams], dev: Device
) -> dict[str, Any]:
    result = timed_generate(llm, prompts, params)
    reqs = [(len(p), sp.max_tokens) for p, sp in zip(prompts, params, strict=True)]
    floor_s = workload_floor_s(llm.core.arch, dev, reqs, llm.config.max_num_seqs)
    result.update(
        workload=name,
        shape=shape,
        engine={k: v for k, v in llm.config.model_dump().items() if k != "model"},
        floor_s=round(floor_s, 2),
        floor_output_tok_s=round(result["output_tokens"] / floor_s, 1),
        fraction_of_floor=round(floor_s / result["elapsed_s"], 3),
    )
    print(
        f"[{shape}] {name}: {result['output_tok_s']} output tok/s "
        f"(floor {result['floor_output_tok_s']}, {result['fraction_of_floor']:.0%} of it)",
        flush=True,
    )
    return result


def run_workload(
    name: str, shape: str, prompts: list[list[int]], params: list[SamplingParams], dev: Device, **engine: Any
) -> dict[str, Any]:
    llm = make_llm(shape, **engine)
    result = measure_workload(llm, name, shape, prompts, params, dev)
    llm.core.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="llama-3.1-8b")
    parser.add_argument("--workloads", default="nano,random,wfixed")
    parser.add_argument("--with-hf", action="store_true", help="also time HF generate() on W-fixed256")
    parser.add_argument("--name", default="throughput")
    args = parser.parse_args()
    dev, ceilings = measured_device()
    print(f"device ceilings: {ceilings}", flush=True)
    results: dict[str, Any] = {**provenance(), "ceilings": ceilings, "runs": []}
    workloads = args.workloads.split(",")
    for shape in args.shapes.split(","):
        if "wfixed" in workloads and args.with_hf:
            hf = hf_baselines(shape, wfixed256_prompts())
            print(f"[{shape}] {hf}", flush=True)
            results["hf_baseline"] = hf
        if "nano" in workloads:
            prompts, params = nano_vllm_workload()
            results["runs"].append(
                run_workload("nano-vllm", shape, prompts, params, dev, max_num_seqs=256, max_num_batched_tokens=16384)
            )
        if "random" in workloads:
            prompts, params = random_fixed_workload()
            results["runs"].append(
                run_workload(
                    "random-256-256x1000", shape, prompts, params, dev, max_num_seqs=512, max_num_batched_tokens=8192
                )
            )
        if "wfixed" in workloads:
            prompts = wfixed256_prompts()
            params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=256)] * len(prompts)
            run = run_workload(
                "W-fixed256", shape, prompts, params, dev, max_num_seqs=256, max_num_batched_tokens=16384
            )
            if "hf_baseline" in results:
                run["speedup_vs_hf_static"] = round(run["output_tok_s"] / results["hf_baseline"]["out_tok_s"], 1)
            results["runs"].append(run)
        write_result(args.name, results)


if __name__ == "__main__":
    main()
