"""Decode latency: ms per step at batch 1 and batch 128 after a 128-token prompt, beside the floor.

Run from the repo root: `python -m bench.latency`. A step is timed end to end through the engine core
(schedule, inputs, graph replay, sampling, the token back on the host), as a server would see it.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch
from kvpilot.engine import SamplingParams

from bench.common import provenance, write_result
from bench.engine_common import make_llm, measured_device
from bench.floors import decode_step_floor_s


def decode_ms_per_step(llm: Any, batch: int, prompt_len: int = 128, steps: int = 64) -> float:
    core = llm.core
    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=steps + 8)
    for i in range(batch):
        llm.add_request([rng.randrange(1000, 100000) for _ in range(prompt_len)], params, request_id=f"b{batch}-{i}")
    while any(s.num_output_tokens == 0 for r in core.requests.values() for s in r.seqs):
        llm.step()  # prefill (possibly chunked) until every sequence decodes
    for _ in range(4):
        llm.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        llm.step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    for request_id in list(core.requests):
        llm.abort(request_id)
    while core.has_unfinished:
        llm.step()
    return 1000 * elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--name", default="latency")
    args = parser.parse_args()
    dev, ceilings = measured_device()
    llm = make_llm(args.shape, max_num_seqs=128, max_num_batched_tokens=16384)
    results: dict[str, Any] = {**provenance(), "ceilings": ceilings, "shape": args.shape, "runs": []}
    for batch in (1, 128):
        ms = decode_ms_per_step(llm, batch)
        floor = 1000 * decode_step_floor_s(llm.core.arch, dev, batch, 128 + 40)
        run = {
            "batch": batch,
            "prompt_len": 128,
            "ms_per_step": round(ms, 3),
            "floor_ms": round(floor, 3),
            "fraction_of_floor": round(floor / ms, 3),
        }
        print(run, flush=True)
        results["runs"].append(run)
    write_result(args.name, results)


if __name__ == "__main__":
    main()
