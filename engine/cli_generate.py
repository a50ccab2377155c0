"""`kvpilot generate --model DIR|demo "prompt" ...`: offline generation from the command line."""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kvpilot.engine.flags import add_engine_flags

    parser.add_argument("prompts", nargs="+", help="one or more prompts")
    add_engine_flags(parser.add_argument_group("engine (EngineConfig's knobs, as `kvpilot serve` has them)"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def run(args: argparse.Namespace) -> int:
    from kvpilot.engine import LLM, SamplingParams
    from kvpilot.engine.flags import engine_values

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.sample_seed,
        )
        llm = LLM(**engine_values(args))
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prompts = args.prompts
    if args.chat:
        prompts = [
            llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    try:
        outputs = llm.generate(prompts, params)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for prompt, out in zip(args.prompts, outputs, strict=True):
        sample = out.outputs[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": sample.text,
                        "token_ids": sample.token_ids,
                        "finish_reason": sample.finish_reason,
                    }
                )
            )
        else:
            print(f"{prompt}{sample.text}\n[{len(sample.token_ids)} tokens, finish_reason={sample.finish_reason}]")
    return 0
