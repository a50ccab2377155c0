"""What the engine benchmarks share: the model shapes, the device ceilings, and the timed generate call."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from kvpilot.engine import LLM, SamplingParams

from bench.common import measure_bf16_matmul_tflops, measure_hbm_bandwidth
from bench.floors import Device

CONFIGS = Path(__file__).resolve().parent / "configs"
SHAPES = {"llama-3.1-8b": CONFIGS / "llama-3.1-8b", "qwen3-0.6b": CONFIGS / "qwen3-0.6b"}


def measured_device() -> tuple[Device, dict[str, float]]:
    bw = measure_hbm_bandwidth()
    tflops = measure_bf16_matmul_tflops()
    # A device-to-device copy counting bytes read and written is the practical HBM ceiling (the anchors' figure).
    return Device(bandwidth_Bps=bw["copy_tbps"] * 1e12, peak_flops=tflops * 1e12), {**bw, "bf16_tflops": tflops}


def make_llm(shape: str, **overrides: Any) -> LLM:
    """An LLM on dummy weights in one of SHAPES, or any folder of bench/configs (e.g. qwen3-30b-a3b)."""
    config = {"load_format": "dummy", "dtype": "bfloat16", "max_model_len": 4096, **overrides}
    return LLM(str(SHAPES.get(shape, CONFIGS / shape)), **config)


def timed_generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, float]:
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    stats = llm.core.stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "blocks leaked"
    return {
        "elapsed_s": round(elapsed, 3),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "output_tok_s": round(out_tokens / elapsed, 1),
        "total_tok_s": round((in_tokens + out_tokens) / elapsed, 1),
        "preemptions": stats.num_preemptions,
        "kv_blocks": stats.num_total_blocks,
    }
