"""Ready means warm: before the engine core reports ready it runs every kind of step it can meet.

Prefills of several lengths (chunked beyond the step budget) join decodes already running, so mixed steps, the
decode graphs and the piecewise graphs all run, and every sampling path does (greedy, top-k/top-p, seeded with
min-p and logprobs, penalties and logit_bias on the synchronous path, a grammar). Without this the first load
after ready paid for kernel compiles (TTFT p95 2.5 s on an H200). The core is reset afterwards.
A mixture of experts' block runs in every one of these steps; the tile configs its kernels take at other token
counts were compiled when the runner was built (models/moe.py's warm_up_experts), and a sliding window's kernel
variants are the ones every step of a windowed model launches. The same steps compile the FP8 kernels when the
engine runs them: the e4m3 cache variants of store and attention, and each token-count tile band of the Triton
FP8 GEMM (<= 16 rows: decode batches; <= 64: the 17-token prompt joining decodes; more: the longer prompts).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from kvpilot.engine.config import SamplingParams, StructuredOutputs
from kvpilot.engine.messages import EngineRequest
from kvpilot.engine.model_info import has_tokenizer

if TYPE_CHECKING:
    from kvpilot.engine.engine_core import EngineCore

log = logging.getLogger(__name__)

KINDS = [
    SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=1.0, seed=1, min_p=0.05, logprobs=2, ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.1,
                   logit_bias={1: 1.0}, min_tokens=2, stop_token_ids=[3], ignore_eos=True),
    SamplingParams(max_tokens=8, temperature=0.7, structured_outputs=StructuredOutputs(json_object=True)),
]


def warm_up(core: EngineCore) -> None:
    start = time.perf_counter()
    longest = min(core.config.max_num_batched_tokens + 64, (core.config.max_model_len or 0) - 16)
    lengths = [n for n in (1, 2, 17, 64, 333, longest) if 0 < n <= longest]
    # A model without a tokenizer takes no grammar (its requests get a clear error): nothing to warm.
    grammars = has_tokenizer(core.grammars.compiler.model_dir)
    kinds = [kind for kind in KINDS if grammars or kind.structured_outputs is None]
    for i, n in enumerate(lengths):
        prompt = [7 + (j % 1000) for j in range(n)]
        core.add(EngineRequest(f"warmup-{i}", prompt, kinds[i % len(kinds)], time.monotonic()))
        core.step()  # the next prompt joins the decodes already running: mixed steps too
    while core.has_unfinished:
        core.step()
    core.reset()
    if core.runner.device.type == "cuda":
        torch.cuda.synchronize()
    log.info("warm-up: %d prompt lengths up to %d tokens, every sampling path, in %.1f s", len(lengths), longest,
             time.perf_counter() - start)
