"""What FP8 costs on a real checkpoint (issue 14): logit error, KL and top-1 agreement, teacher-forced.

    python -m bench.fp8_accuracy --model /models/Llama-3.1-8B-Instruct [--prompts 16 --tokens 32]

The same measurement as tests/engine/test_fp8_accuracy.py (engine/quant/accuracy.py), on any model and device:
the unquantized engine's greedy continuations of seeded random prompts, teacher-forced through it and through
FP8 weights, an FP8 KV cache, and both. Writes bench/results/fp8-accuracy-<model>.json with provenance and
every engine's resolved config. On CUDA the engines load one after another (each is closed before the next).
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import torch

from bench.common import provenance, write_result

MODES: dict[str, dict[str, Any]] = {
    "weights": {"quantization": "fp8"},
    "kv_cache": {"kv_cache_dtype": "fp8"},
    "both": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
}


def _close(llm: Any) -> None:
    llm.core.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    from kvpilot.engine import LLM
    from kvpilot.engine.quant.accuracy import compare, prompts, reference_logits, teacher_forced_logits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {', '.join(MODES)}")
    args = parser.parse_args()
    common = {"dtype": args.dtype, "max_num_seqs": max(args.prompts, 16)}
    reference = LLM(args.model, **common)
    ids = prompts(reference.core.runner.arch.vocab_size, count=args.prompts)
    continuations, ref_logits = reference_logits(reference, ids, args.tokens)
    result: dict[str, Any] = {"model": args.model, "prompts": args.prompts, "tokens": args.tokens,
                              "reference_config": reference.config.model_dump(), "modes": {}}
    _close(reference)
    for mode in args.modes.split(","):
        candidate = LLM(args.model, **common, **MODES[mode])
        got = compare(ref_logits, teacher_forced_logits(candidate.core, ids, continuations))
        result["modes"][mode] = {**got.as_dict(), "config": candidate.config.model_dump(),
                                 "kv": candidate.core.runner.kv_description}
        print(mode, got, flush=True)
        _close(candidate)
    write_result(f"fp8-accuracy-{Path(args.model).name}", {**provenance(), **result})


if __name__ == "__main__":
    main()
