"""Where a decode step's time goes: graph replay alone vs the whole engine step (async and sync), eager, and
the kernel breakdown of one eager step.

Run: `python -m bench.profile_decode [--shape llama-3.1-8b] [--batch 1,128]`. The kernel table comes from one
eager step under torch.profiler (graph replays hide kernels from it), with the decode and the piecewise graphs
both set aside, so its forward launches what the captured decode graph holds (the piecewise path would add its
static-buffer copies and, for a small batch, pad it to 16 rows); each kernel's time and launch count are kept.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from typing import Any

import torch
from kvpilot.engine import SamplingParams
from torch.profiler import ProfilerActivity, profile

from bench.common import provenance, write_result
from bench.engine_common import make_llm


def _prepare_decode(llm: Any, batch: int) -> None:
    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=400)
    for i in range(batch):
        llm.add_request([rng.randrange(1000, 100000) for _ in range(128)], params, request_id=f"p{batch}-{i}")
    core = llm.core
    while any(s.num_output_tokens == 0 for r in core.requests.values() for s in r.seqs):
        llm.step()


def _time(fn: Any, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / reps


def profile_batch(llm: Any, batch: int) -> dict[str, Any]:
    _prepare_decode(llm, batch)
    core, runner = llm.core, llm.core.runner
    graphs = runner.graphs
    size = next(s for s in graphs.sizes if s >= batch)
    replay_ms = _time(lambda: graphs.graphs[size].replay())
    step_ms = _time(llm.step)
    core.async_scheduling = False
    sync_step_ms = _time(llm.step)
    core.async_scheduling = True
    piecewise, runner.graphs, runner.piecewise = runner.piecewise, None, None  # eager: the graphs' own kernels
    eager_ms = _time(llm.step, reps=5)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.step()
        torch.cuda.synchronize()
    runner.graphs, runner.piecewise = graphs, piecewise
    kernels: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for evt in prof.key_averages():
        if evt.device_type.name == "CUDA" or getattr(evt, "self_device_time_total", 0):
            kernels[evt.key[:80]] += evt.self_device_time_total / 1000
            counts[evt.key[:80]] += evt.count
    total = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:14]
    most = sorted(counts.items(), key=lambda kv: -kv[1])[:14]
    for request_id in list(core.requests):
        llm.abort(request_id)
    while core.has_unfinished:
        llm.step()
    return {
        "batch": batch,
        "graph_replay_ms": round(replay_ms, 3),
        "engine_step_ms": round(step_ms, 3),
        "engine_step_sync_ms": round(sync_step_ms, 3),
        "eager_step_ms": round(eager_ms, 3),
        "step_over_replay_ms": round(step_ms - replay_ms, 3),
        "kernel_sum_ms": round(total, 3),
        "kernels_per_step": sum(counts.values()),
        "top_kernels_ms": {k: round(v, 3) for k, v in top},
        "top_kernels_launches": {k: counts[k] for k, _ in top},
        "most_launched": dict(most),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="llama-3.1-8b", help="a folder of bench/configs")
    parser.add_argument("--batch", default="1,128")
    parser.add_argument("--name", default="profile_decode")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    llm = make_llm(args.shape, max_num_seqs=max(128, *batches), max_num_batched_tokens=16384)
    runs = [profile_batch(llm, b) for b in batches]
    for run in runs:
        print(run, flush=True)
    write_result(args.name, {**provenance(), "shape": args.shape, "runs": runs})


if __name__ == "__main__":
    main()
