"""The Triton backend inside the real engine (interpreted on CPU): chunked prefill, prefix-cache hits and
decode give the same greedy tokens as the PyTorch reference backend on a tiny fp32 Llama, with an fp32 cache
and with an e4m3 one (each backend calibrates its per-head scales, equal to fp32 rounding)."""

from __future__ import annotations

import pytest
from kvpilot.engine import LLM, SamplingParams

pytestmark = pytest.mark.slow  # the whole engine through Triton's CPU interpreter


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_engine_greedy_tokens_match_reference_backend(tiny_model, kv_cache_dtype: str) -> None:
    model = tiny_model("llama")
    shared = list(range(3, 40))  # 37 tokens: two full blocks reusable from the prefix cache
    prompts = [[*shared, 50, 51], list(range(100, 117)), [*shared, 60], [9]]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            str(model),
            device="cpu",
            dtype="float32",
            attention_backend=backend,
            block_size=16,
            max_num_batched_tokens=24,  # forces chunked prefill of the longer prompts
            max_num_seqs=4,
            enable_prefix_caching=True,
            kv_cache_dtype=kv_cache_dtype,
        )
        assert llm.core.runner.backend.name == backend
        first = llm.generate(prompts[:2], params)
        rest = llm.generate(prompts[2:], params)  # the third prompt hits the cached shared prefix
        tokens[backend] = [out.outputs[0].token_ids for out in first + rest]
    assert tokens["triton"] == tokens["torch"]
    assert all(len(t) == 5 for t in tokens["triton"])
