"""Where the host's time goes in an offline run: cProfile over `generate` of random 256/256 prompts.

Run on the GPU machine: `python -m bench.profile_host [--requests 512] [--temperature 1.0]`. It found the
sampler's pageable uploads, which waited for the GPU every step (12 ms a step at temperature 1).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import time

from kvpilot.engine import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    llm = LLM("bench/configs/llama-3.1-8b", load_format="dummy", dtype="bfloat16", max_model_len=8192)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(256)] for _ in range(args.requests)]
    params = SamplingParams(temperature=args.temperature, max_tokens=256, ignore_eos=True)
    llm.generate(prompts[:4], params)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    llm.generate(prompts, params)
    profiler.disable()
    elapsed = time.perf_counter() - start
    print(f"{args.requests * 256 / elapsed:.0f} out tok/s under the profiler ({elapsed:.1f} s)")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    print(text.getvalue())


if __name__ == "__main__":
    main()
