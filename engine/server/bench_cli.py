"""`kvpilot bench <kind>`: benchmarks, one subcommand each; `serve` drives load at a running server.

Each entry of BENCHES registers its flags and its runner, so other benchmarks (throughput, ...)
slot in beside `serve` without touching it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from pydantic import ValidationError

if TYPE_CHECKING:
    from kvpilot.engine.server.loadgen import BenchResult

log = logging.getLogger(__name__)


def _rate(value: str) -> float:
    rate = math.inf if value.lower() in {"inf", "infinity"} else float(value)
    if rate <= 0:
        raise argparse.ArgumentTypeError("request rate must be positive (or 'inf')")
    return rate


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model name (default: the server's first)")
    p.add_argument("--workload", choices=["random", "shared-prefix", "file"], default="random")
    p.add_argument("--request-rate", type=_rate, default=math.inf, help="arrivals per second (Poisson), or inf")
    p.add_argument("--max-concurrency", type=int, help="most requests in flight")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, help="write the result JSON here")
    p.add_argument("--summary-file", type=Path,
                   help="write a short JSON summary here (< 4 KiB: fits a Job's /dev/termination-log)")
    p.add_argument("--api-key", default=os.environ.get("KVPILOT_API_KEY"), help="default: $KVPILOT_API_KEY")
    p.add_argument("--vocab-size", type=int, help="token ids for random prompts lie below (default: from server)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="let EOS end outputs early")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--slo-ttft", type=float, help="TTFT target (s) for goodput")
    p.add_argument("--slo-tpot", type=float, help="TPOT target (s) for goodput")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--keep-requests", action="store_true", help="include per-request records in the JSON")
    w = p.add_argument_group("workloads")
    w.add_argument("--input-len", type=int, nargs=2, metavar=("MIN", "MAX"), default=[128, 128],
                   help="random: prompt length range in tokens")
    w.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"), default=[64, 64],
                   help="random: output range; shared-prefix and file: MIN is used")
    w.add_argument("--num-groups", type=int, default=4, help="shared-prefix: distinct prefixes")
    w.add_argument("--prompts-per-group", type=int, default=16, help="shared-prefix: prompts per prefix")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: prefix tokens")
    w.add_argument("--suffix-len", type=int, default=32, help="shared-prefix: per-prompt tokens after the prefix")
    w.add_argument("--file", type=Path, help="file: JSONL of {\"prompt\": ..., \"max_tokens\": ...}")


def _workload(args: argparse.Namespace) -> dict[str, object]:
    common = {"num_prompts": args.num_prompts, "seed": args.seed}
    if args.workload == "random":
        return {**common, "kind": "random", "min_input_len": args.input_len[0], "max_input_len": args.input_len[1],
                "min_output_len": args.output_len[0], "max_output_len": args.output_len[1]}
    if args.workload == "shared-prefix":
        return {"seed": args.seed, "kind": "shared-prefix", "num_groups": args.num_groups,
                "prompts_per_group": args.prompts_per_group, "prefix_len": args.prefix_len,
                "suffix_len": args.suffix_len, "output_len": args.output_len[0]}
    if args.file is None:
        raise ValueError("--workload file needs --file")
    return {**common, "kind": "file", "path": args.file, "output_len": args.output_len[0]}


def _print_summary(result: BenchResult) -> None:
    print(f"requests: {result.completed} completed, {result.failed} failed {result.failures or ''}")
    print(f"duration: {result.duration_s:.2f} s   request throughput: {result.request_throughput:.2f}/s   "
          f"output tokens/s: {result.output_throughput:.1f}   total tokens/s: {result.total_token_throughput:.1f}")
    if result.goodput is not None:
        print(f"goodput: {result.goodput:.2f} requests/s within SLO")
    for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        p = getattr(result, name)
        if p.count:
            print(f"{name[:-2].upper():>5} ms  mean {p.mean * 1e3:8.1f}  p50 {p.p50 * 1e3:8.1f}  "
                  f"p90 {p.p90 * 1e3:8.1f}  p99 {p.p99 * 1e3:8.1f}")


def summary_json(result: BenchResult) -> str:
    """What a caller that cannot read the full result needs (the operator reads it from the Job's pod status)."""
    fields = ("started_at", "duration_s", "num_requests", "completed", "failed", "failures", "output_throughput")
    return json.dumps({k: getattr(result, k) for k in fields}, separators=(",", ":"))


def run_serve(args: argparse.Namespace) -> int:
    from kvpilot.engine.server.loadgen import BenchConfig, run_benchmark

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the summary
    try:
        config = BenchConfig(
            url=args.url, model=args.model, workload=_workload(args), request_rate=args.request_rate,
            max_concurrency=args.max_concurrency, vocab_size=args.vocab_size, api_key=args.api_key,
            ignore_eos=not args.no_ignore_eos, temperature=args.temperature, timeout_s=args.timeout,
            slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot, progress=not args.no_progress,
            keep_requests=args.keep_requests,
        )
        result = asyncio.run(run_benchmark(config))
    except (ValidationError, ValueError, httpx.HTTPError) as exc:
        log.error("bench serve: %s", exc)
        if args.summary_file:
            args.summary_file.write_text(json.dumps({"error": str(exc)[:1000]}))
        return 2
    _print_summary(result)
    if args.output:
        args.output.write_text(result.model_dump_json(indent=2))
        print(f"wrote {args.output}")
    if args.summary_file:
        args.summary_file.write_text(summary_json(result))
    return 0 if result.completed else 1


# name -> (help, add_arguments, run)
BENCHES: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "serve": ("drive load at a running server: latency percentiles and throughput", add_serve_arguments, run_serve),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (help_text, add, _) in BENCHES.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run(args: argparse.Namespace) -> int:
    return BENCHES[args.bench][2](args)
