"""Structured decoding's cost and jump-forward's saving.

    python bench/structured.py --model <dir> --batch 64        # the H200 target: constrained vs free throughput
    python bench/structured.py --model demo --device cpu --batch 8 --output-len 200   # what CI's machine can run

Two measurements, each written to bench/results/structured-<device>.json with device, commit, date and every
knob:
- throughput: `batch` requests of `output_len` tokens (ignore_eos for the free ones), unconstrained, then the
  same prompts each constrained to a JSON schema (a long-keyed object of free strings, so the grammar rarely
  ends it early), jump-forward off so both decode the same number of steps; output tok/s and the ratio. The
  issue's target: constrained costs <= 10% of unconstrained at batch 64.
- jump-forward: one schema with long fixed keys, greedy, with jump_forward on and off: engine steps, wall
  time, output tokens and tokens forced.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_kvpilot_importable, provenance, write_result

ensure_kvpilot_importable()

LONG_KEYS = [f"configuration_parameter_number_{i}_value" for i in range(12)]


def _schema(kind: str) -> dict[str, Any]:
    value = {"type": "boolean"} if kind == "jump" else {"type": "string"}
    return {"type": "object", "properties": {k: value for k in LONG_KEYS}, "required": LONG_KEYS,
            "additionalProperties": False}


def _run(llm: Any, prompts: list[list[int]], params: list[Any]) -> tuple[float, int, int]:
    """Wall seconds, engine steps and output tokens of one batch, stepped to the end."""
    ids = [llm.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    steps, tokens, start = 0, 0, time.perf_counter()
    done: set[str] = set()
    while len(done) < len(ids):
        steps += 1
        for out in llm.step():
            done.add(out.request_id)
            tokens += sum(len(o.token_ids) for o in out.outputs)
    return time.perf_counter() - start, steps, tokens


def _release() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=float, help="each engine's KV pool (default: the engine's sizing)")
    args = parser.parse_args()
    from kvpilot.engine import LLM, SamplingParams, StructuredOutputs

    knobs = {"model": args.model, "device": args.device, "load_format": args.load_format,
             "max_model_len": args.max_model_len, "max_num_seqs": max(args.batch, 8)}
    if args.kv_cache_gib:
        knobs["kv_cache_memory_bytes"] = int(args.kv_cache_gib * 1024**3)
    results: dict[str, Any] = {"knobs": {**knobs, "batch": args.batch, "input_len": args.input_len,
                                         "output_len": args.output_len}}
    prompts = [[(7 * i + j) % 200 + 10 for j in range(args.input_len)] for i in range(args.batch)]
    llm = LLM(jump_forward=False, **knobs)
    # Unseeded, as most serving traffic: a seeded row draws from its own generator, one launch per row.
    free = SamplingParams(max_tokens=args.output_len, temperature=1.0, ignore_eos=True)
    constrained = free.model_copy(update={"structured_outputs": StructuredOutputs(json=_schema("throughput"))})
    _run(llm, prompts[:2], [free, constrained])  # compile and warm
    rows = {}
    for name, sp in (("free", free), ("constrained", constrained)):
        wall, steps, tokens = _run(llm, prompts, [sp] * args.batch)
        rows[name] = {"wall_s": wall, "steps": steps, "output_tokens": tokens, "tok_per_s": tokens / wall}
        print(f"{name:12s} {tokens} tokens in {wall:.2f} s over {steps} steps: {tokens / wall:,.0f} tok/s")
    rows["constrained_over_free"] = rows["constrained"]["tok_per_s"] / rows["free"]["tok_per_s"]
    results["throughput"] = rows
    del llm  # one engine at a time: each sizes its pool from the memory the others leave
    _release()
    jump: dict[str, Any] = {}
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0,
                            structured_outputs=StructuredOutputs(json=_schema("jump")))
    for on in (True, False):
        engine = LLM(jump_forward=on, **knobs)
        _run(engine, prompts[:1], [params])  # compile
        forced = engine.core.jump_forward_tokens
        wall, steps, tokens = _run(engine, prompts[:1], [params])
        jump["on" if on else "off"] = {"wall_s": wall, "steps": steps, "output_tokens": tokens,
                                       "forced_tokens": engine.core.jump_forward_tokens - forced}
        print(f"jump-forward {'on ' if on else 'off'}: {steps} steps, {wall * 1000:.0f} ms, {tokens} tokens")
        del engine
        _release()
    results["jump_forward"] = jump
    device = "cpu" if args.device == "cpu" else "gpu"
    write_result(f"structured-{device}", {**provenance(), **results})


if __name__ == "__main__":
    main()
