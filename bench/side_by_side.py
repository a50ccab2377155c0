"""The same workloads, the same method, against kvpilot or vLLM: offline throughput and decode latency, and
serving (cold start, first load after ready, a Poisson rate sweep, the highest rate holding the SLO).

    python -m bench.side_by_side offline --engine kvpilot|vllm [--workloads decode,nano,random,prefix,mixed]
    python -m bench.side_by_side serve --engine kvpilot|vllm [--rates 8,16,24,32,48,64]
    python -m bench.side_by_side offline --engine kvpilot|vllm --shape qwen3-30b-a3b --workloads decode,random \
        --decode-batches 1,64      (issue 15's MoE targets; mixtral-8x7b likewise)

`--quantization fp8` and `--kv-cache-dtype fp8` (vLLM's names; both engines take them) run either engine in FP8
(issue 14); `--workloads decode_long` times batch-64 decode at an 8K context, where the FP8 KV cache matters.

vLLM is imported only when asked for (`--engine vllm`, with vLLM importable); kvpilot never depends on it.
Prompts are token ids (dummy weights, no tokenizer), outputs ignore EOS; random ids lie below the shape's
vocabulary (100,000 for the Llama shapes, 32,000 for Mixtral's). Each run writes one JSON under
bench/results/ with the device, commit, date, every knob the engine resolved, and every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import provenance, write_result

CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Spec:
    max_tokens: int
    temperature: float


# ---- workloads (token-id prompts, reproducible) ------------------------------------------------------------
def _id_bounds(vocab: int) -> tuple[int, int]:
    """Random prompt ids: [1000, 100000) for the Llama shapes as before, inside smaller vocabularies."""
    hi = min(100_000, vocab)
    return min(1000, hi // 2), hi


def nano_workload(vocab: int) -> tuple[list[list[int]], list[Spec]]:
    """nano-vllm's bench.py: all prompts drawn first, then the output lengths (fingerprint checked).

    Its ids lie below 10,000, inside every shape's vocabulary, so `vocab` changes nothing here.
    """
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    specs = [Spec(random.randint(100, 1024), 0.6) for _ in range(256)]
    assert (sum(map(len, prompts)), sum(s.max_tokens for s in specs)) == (142_827, 133_966)
    return prompts, specs


def random_workload(vocab: int) -> tuple[list[list[int]], list[Spec]]:
    rng, ids = random.Random(0), _id_bounds(vocab)
    return [[rng.randrange(*ids) for _ in range(256)] for _ in range(1000)], [Spec(256, 1.0)] * 1000


def prefix_workload(vocab: int) -> tuple[list[list[int]], list[Spec]]:
    rng, ids = random.Random(0), _id_bounds(vocab)
    prompts = []
    for _ in range(64):
        shared = [rng.randrange(*ids) for _ in range(2048)]
        prompts += [shared + [rng.randrange(*ids) for _ in range(128)] for _ in range(16)]
    return prompts, [Spec(256, 0.0)] * len(prompts)


def mixed_workload(vocab: int) -> tuple[list[list[int]], list[Spec]]:
    """Skewed like chat traffic: mostly short turns, some long documents, a few long generations."""
    rng, ids = random.Random(1), _id_bounds(vocab)
    prompts, specs = [], []
    for _ in range(600):
        kind = rng.random()
        if kind < 0.65:
            n_in, n_out = rng.randint(16, 256), rng.randint(16, 160)
        elif kind < 0.85:
            n_in, n_out = rng.randint(512, 2048), rng.randint(64, 384)
        elif kind < 0.95:
            n_in, n_out = rng.randint(3072, 6144), rng.randint(16, 128)
        else:
            n_in, n_out = rng.randint(64, 512), rng.randint(768, 1536)
        prompts.append([rng.randrange(*ids) for _ in range(n_in)])
        specs.append(Spec(n_out, 0.8))
    return prompts, specs


WORKLOADS = {"nano": nano_workload, "random": random_workload, "prefix": prefix_workload, "mixed": mixed_workload}


def shape_dir(shape: str) -> Path:
    """A folder of bench/configs, or a model directory given by path."""
    return CONFIGS / shape if (CONFIGS / shape).is_dir() else Path(shape)


def vocab_size(shape: str) -> int:
    return int(json.loads((shape_dir(shape) / "config.json").read_text())["vocab_size"])


# ---- engines ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    quantization: str | None = None
    kv_cache_dtype: str = "auto"

    def kwargs(self) -> dict[str, Any]:
        return {"quantization": self.quantization, "kv_cache_dtype": self.kv_cache_dtype}

    def flags(self) -> list[str]:
        return [*(["--quantization", self.quantization] if self.quantization else []),
                "--kv-cache-dtype", self.kv_cache_dtype]


class KvpilotOffline:
    name = "kvpilot"

    def __init__(self, shape: str, max_model_len: int, precision: Precision, extra: dict[str, Any]) -> None:
        from kvpilot.engine import LLM

        self.llm = LLM(str(shape_dir(shape)), load_format="dummy", dtype="bfloat16", max_model_len=max_model_len,
                       **precision.kwargs(), **extra)

    def generate(self, prompts: list[list[int]], specs: list[Spec]) -> int:
        from kvpilot.engine import SamplingParams

        params = [SamplingParams(temperature=s.temperature, max_tokens=s.max_tokens, ignore_eos=True) for s in specs]
        return sum(len(o.outputs[0].token_ids) for o in self.llm.generate(prompts, params))

    def knobs(self) -> dict[str, Any]:
        return {**self.llm.config.model_dump(), "num_kv_blocks_resolved": self.llm.core.kv.num_blocks,
                "async_scheduling_resolved": self.llm.core.async_scheduling}


class VllmOffline:
    name = "vllm"

    def __init__(self, shape: str, max_model_len: int, precision: Precision, extra: dict[str, Any]) -> None:
        from vllm import LLM

        self.llm = LLM(model=str(shape_dir(shape)), load_format="dummy", dtype="bfloat16", max_model_len=max_model_len,
                       skip_tokenizer_init=True, gpu_memory_utilization=0.9, **precision.kwargs(), **extra)

    def generate(self, prompts: list[list[int]], specs: list[Spec]) -> int:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(temperature=s.temperature, max_tokens=s.max_tokens, ignore_eos=True,
                                 detokenize=False) for s in specs]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def knobs(self) -> dict[str, Any]:
        import vllm

        cfg = self.llm.llm_engine.vllm_config
        sched, cache = cfg.scheduler_config, cfg.cache_config
        return {"vllm_version": vllm.__version__, "max_num_seqs": sched.max_num_seqs,
                "max_num_batched_tokens": sched.max_num_batched_tokens,
                "enable_chunked_prefill": getattr(sched, "enable_chunked_prefill", None),
                "enable_prefix_caching": cache.enable_prefix_caching, "block_size": cache.block_size,
                "num_gpu_blocks": cache.num_gpu_blocks, "gpu_memory_utilization": cache.gpu_memory_utilization,
                "compilation_config": str(cfg.compilation_config)[:2000]}


def engine_args(pairs: list[str]) -> dict[str, Any]:
    """`--engine-arg max_num_seqs=1024` pairs as constructor keywords; a value that parses as JSON is taken as
    such (numbers, booleans), any other as a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--engine-arg takes KEY=VALUE, not {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _timed(engine: Any, prompts: list[list[int]], specs: list[Spec]) -> tuple[float, int]:
    start = time.perf_counter()
    out_tokens = engine.generate(prompts, specs)
    return time.perf_counter() - start, out_tokens


def decode_ms(engine: Any, batch: int, vocab: int, prompt_len: int = 128, temperature: float = 0.0) -> float:
    """(time at max_tokens 256 - time at 32) / 224 after a prompt_len prompt, best of 2: prefill and start-up
    cancel. A first pass caches the prompts (both engines cache prefixes), so the first timed call does not
    pay a prefill the others skip (at an 8K context that made the difference negative).

    Greedy by default. On dummy weights greedy rows may all emit the same few tokens, so an MoE's rows route
    to the same experts and read a fraction of the expert weights a real batch reads; `decode_sampled`
    (temperature 1.0) keeps the rows' tokens, and so their routing, apart."""
    rng, ids = random.Random(batch), _id_bounds(vocab)
    prompts = [[rng.randrange(*ids) for _ in range(prompt_len)] for _ in range(batch)]
    _timed(engine, prompts, [Spec(1, temperature)] * batch)
    best = float("inf")
    for _ in range(2):
        short, _ = _timed(engine, prompts, [Spec(32, temperature)] * batch)
        long, _ = _timed(engine, prompts, [Spec(256, temperature)] * batch)
        best = min(best, (long - short) / 224 * 1000)
    return best


def run_offline(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    precision = Precision(args.quantization, args.kv_cache_dtype)
    extra = engine_args(args.engine_arg)
    engine = (KvpilotOffline if args.engine == "kvpilot" else VllmOffline)(args.shape, args.max_model_len, precision,
                                                                          extra)
    init_s = round(time.perf_counter() - start, 1)
    result: dict[str, Any] = {"engine": args.engine, "shape": args.shape, "precision": precision.kwargs(),
                              "engine_args": extra, "init_s": init_s, "knobs": engine.knobs(), "workloads": {}}
    engine.generate([[5, 6, 7] * 40], [Spec(8, 0.0)])  # one warm request, as both engines' servers do
    vocab = vocab_size(args.shape)
    for name in args.workloads.split(","):
        if name in ("decode", "decode_sampled"):
            batches, temp = [int(b) for b in args.decode_batches.split(",")], 1.0 if name == "decode_sampled" else 0.0
            result["workloads"][name] = {f"b{b}_ms": round(decode_ms(engine, b, vocab, temperature=temp), 3)
                                         for b in batches}
        elif name == "decode_long":  # 8K context: the prompt leaves room for the 256 tokens decoded
            context = min(8192, args.max_model_len) - 256
            result["workloads"]["decode_long"] = {"context": context,
                                                  "b64_ms": round(decode_ms(engine, 64, vocab, context), 3)}
        else:
            prompts, specs = WORKLOADS[name](vocab)
            elapsed, out_tokens = _timed(engine, prompts, specs)
            result["workloads"][name] = {"requests": len(prompts), "input_tokens": sum(map(len, prompts)),
                                         "output_tokens": out_tokens, "elapsed_s": round(elapsed, 2),
                                         "out_tok_s": round(out_tokens / elapsed, 1)}
        print(name, json.dumps(result["workloads"][name]), flush=True)
    return result


# ---- serving ------------------------------------------------------------------------------------------------
def _server_cmd(engine: str, shape: str, port: int, max_model_len: int, precision: Precision
                ) -> tuple[list[str], dict[str, str]]:
    model = str(shape_dir(shape))
    common = ["--model", model, "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len",
              str(max_model_len), "--port", str(port), "--host", "127.0.0.1", *precision.flags()]
    if engine == "kvpilot":
        return [sys.executable, "-m", "kvpilot", "serve", *common, "--uvicorn-log-level", "warning"], dict(os.environ)
    # vLLM's packages live apart from kvpilot's (they pin other fastapi/pydantic): only its server sees them.
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "PYTHONPATH": os.environ.get("VLLM_SITE", "/tmp/vsite")}
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common, "--skip-tokenizer-init"], env


def _wait_ready(url: str, engine: str, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    import httpx

    path = "/ready" if engine == "kvpilot" else "/health"
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{engine} server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{engine} server not ready in {timeout_s} s")


def _load(url: str, rate: float, num: int, seed: int, vocab: int, input_len: tuple[int, int] = (512, 1024),
          output_len: tuple[int, int] = (128, 256)) -> dict[str, Any]:
    from kvpilot.engine.server.loadgen import BenchConfig, run_benchmark

    workload = {"kind": "random", "num_prompts": num, "seed": seed, "min_input_len": input_len[0],
                "max_input_len": input_len[1], "min_output_len": output_len[0], "max_output_len": output_len[1]}
    config = BenchConfig(url=url, workload=workload, request_rate=rate, vocab_size=vocab, progress=False,
                         keep_requests=True, timeout_s=300)
    res = asyncio.run(run_benchmark(config))
    recs = res.requests or []
    return {"result": res, "records": recs}


def _figures(recs: list[Any], res: Any | None = None) -> dict[str, Any]:
    """Percentiles over these requests (p95 over every inter-token gap); throughput when `res` is the whole run."""
    ttft = [r.ttft_s for r in recs if r.ok and r.ttft_s is not None]
    itl = [gap for r in recs if r.ok for gap in r.itl_s]

    def pct(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)) * 1000, 1) if values else None

    figures: dict[str, Any] = {"completed": sum(r.ok for r in recs), "failed": sum(not r.ok for r in recs)}
    if res is not None:
        figures["out_tok_s"] = round(res.output_throughput, 1)
    return {**figures, "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p95_ms": pct(itl, 95), "itl_p99_ms": pct(itl, 99)}


def run_serve(args: argparse.Namespace) -> dict[str, Any]:
    port = 8100 if args.engine == "vllm" else 8000
    url = f"http://127.0.0.1:{port}"
    cmd, env = _server_cmd(args.engine, args.shape, port, args.max_model_len,
                           Precision(args.quantization, args.kv_cache_dtype))
    log = open(Path(args.log_dir) / f"serve-{args.engine}.log", "wb")  # noqa: SIM115 - lives as long as the server
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    result: dict[str, Any] = {"engine": args.engine, "shape": args.shape, "command": cmd, "rates": {}}
    try:
        result["start_to_ready_s"] = round(_wait_ready(url, args.engine, proc, args.ready_timeout), 1)
        cold = _load(url, 16, int(16 * args.cold_seconds), seed=7, vocab=args.vocab_size, input_len=args.input_len,
                     output_len=args.output_len)
        first = [r for r in cold["records"] if r.start_s < 15]
        rest = [r for r in cold["records"] if r.start_s >= 15]
        result["first_load_after_ready_16rps"] = {"first_15s": _figures(first), "after_15s": _figures(rest),
                                                  "whole": _figures(cold["records"], cold["result"])}
        print("cold", json.dumps(result["first_load_after_ready_16rps"]), flush=True)
        for rate in (float(r) for r in args.rates.split(",")):
            run = _load(url, rate, args.num_prompts, seed=int(rate), vocab=args.vocab_size, input_len=args.input_len,
                     output_len=args.output_len)
            result["rates"][str(rate)] = _figures(run["records"], run["result"])
            print(rate, json.dumps(result["rates"][str(rate)]), flush=True)
        held = [float(r) for r, f in result["rates"].items()
                if f["failed"] == 0 and f["ttft_p95_ms"] is not None and f["ttft_p95_ms"] <= 500
                and f["itl_p95_ms"] <= 50]
        result["slo"] = {"ttft_p95_ms": 500, "itl_p95_ms": 50, "rates_held": held,
                         "highest_rate_held": max(held, default=None)}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        result["server_wall_s"] = round(time.monotonic() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["offline", "serve"])
    parser.add_argument("--engine", choices=["kvpilot", "vllm"], required=True)
    parser.add_argument("--shape", default="llama-3.1-8b", help="a folder of bench/configs, or a model path")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--vocab-size", type=int, help="serving: random token ids lie below (default: the shape's, "
                        "at most 128000)")
    parser.add_argument("--input-len", type=int, nargs=2, default=(512, 1024), help="serving: prompt length range")
    parser.add_argument("--output-len", type=int, nargs=2, default=(128, 256), help="serving: output length range")
    parser.add_argument("--quantization", choices=["fp8"], default=None, help="FP8 weights (vLLM's flag)")
    parser.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto", help="FP8 KV cache (vLLM's)")
    parser.add_argument("--workloads", default="decode,nano,random,prefix,mixed",
                        help="of decode, decode_sampled (temperature 1), decode_long, nano, random, prefix, mixed")
    parser.add_argument("--decode-batches", default="1,128", help="offline decode: batch sizes timed")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="offline: a keyword for the engine's LLM(), e.g. max_num_seqs=1024 (repeatable)")
    parser.add_argument("--rates", default="8,16,24,32,48,64")
    parser.add_argument("--num-prompts", type=int, default=240)
    parser.add_argument("--cold-seconds", type=float, default=30.0)
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--log-dir", default=os.environ.get("OUT", "."))
    parser.add_argument("--name", help="result file name (default: side-by-side-<mode>-<engine>)")
    args = parser.parse_args()
    args.vocab_size = args.vocab_size or min(128_000, vocab_size(args.shape))
    body = run_offline(args) if args.mode == "offline" else run_serve(args)
    suffix = "".join(f"-{tag}" for tag, on in (("fp8", args.quantization), ("fp8kv", args.kv_cache_dtype != "auto"))
                     if on)
    name = args.name or f"side-by-side-{args.mode}-{args.engine}{suffix}"
    write_result(name, {**provenance(), **body})


if __name__ == "__main__":
    main()
