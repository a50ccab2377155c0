"""The host's share of a decode step, with the forward taken out: scheduling, building the step's inputs,
sampling, reading the samples back and output processing (detokenization included), per running sequence.

Run anywhere (no GPU needed): `python -m bench.host_step [--seqs 64,256,1024] [--steps 48] [--profile]`.
The engine runs the embedded demo model on the CPU with its forward replaced by a constant [rows, 8] logits
tensor, so the sampler's argmax costs nothing and every figure is host work. Under async scheduling the host
prepares step N+1 while the GPU runs step N: once this figure passes the GPU's step time at the same batch,
the GPU waits on Python. `--profile` adds cProfile's heaviest functions (their times inflated by the
profiler). Writes bench/results/host-step.json.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import random
import time
from typing import Any

import torch
from kvpilot.engine import LLM, SamplingParams
from kvpilot.engine.demo import ensure_demo_model

from bench.common import provenance, write_result

PROMPT = 64


def _llm(seqs: int) -> LLM:
    llm = LLM(str(ensure_demo_model()), device="cpu", max_num_seqs=seqs, max_num_batched_tokens=max(8192, 2 * seqs),
              num_kv_blocks=16 * seqs + 64, max_model_len=512)  # fmt: skip
    logits = torch.zeros(seqs, 8)
    logits[:, 5] = 1.0
    llm.core.runner.run = lambda inputs, prev_tokens=None: (logits[: len(inputs.sample_rows)], None)
    return llm


def measure(seqs: int, steps: int, profile: bool) -> dict[str, Any]:
    llm = _llm(seqs)
    rng = random.Random(seqs)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for _ in range(seqs):
        llm.add_request([rng.randrange(10, llm.core.arch.vocab_size) for _ in range(PROMPT)], params)
    while any(s.num_output_tokens == 0 for r in llm.core.requests.values() for s in r.seqs):
        llm.step()  # every prompt computed: what follows is decode alone
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    for _ in range(steps):
        llm.step()
    if profiler is not None:
        profiler.disable()
    ms = 1000 * (time.perf_counter() - start) / steps
    result: dict[str, Any] = {"seqs": seqs, "steps": steps, "host_ms_per_step": round(ms, 3),
                              "host_us_per_seq": round(1000 * ms / seqs, 2),
                              "async_scheduling": llm.core.async_scheduling, "profiled": profile}  # fmt: skip
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        result["profile"] = text.getvalue().splitlines()[-20:]
    llm.core.close()
    del llm
    gc.collect()  # the next size starts from a clean heap: a live engine makes every collection slower
    print(f"{seqs} seqs: {ms:.2f} ms of host work per decode step ({1000 * ms / seqs:.1f} us per sequence)",
          flush=True)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="64,256,1024")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    runs = [measure(int(n), args.steps, args.profile) for n in args.seqs.split(",")]
    print("wrote", *write_result("host-step", {"benchmark": "host_step", **provenance(), "prompt_tokens": PROMPT,
                                               "runs": runs}))  # fmt: skip


if __name__ == "__main__":
    main()
