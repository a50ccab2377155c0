"""The Triton backend inside the real engine (interpreted on CPU): chunked prefill, prefix-cache hits and
decode give the same greedy tokens as the PyTorch reference backend on a tiny fp32 Llama and on a Mistral
whose sliding window (20) is shorter than its prompts, so blocks are given back mid-sequence; each with an fp32
cache and with an e4m3 one (each backend calibrates its per-head scales, equal to fp32 rounding)."""

from __future__ import annotations

import pytest
from kvpilot.engine import LLM, SamplingParams

pytestmark = pytest.mark.slow  # the whole engine through Triton's CPU interpreter


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
@pytest.mark.parametrize("family", ["llama", "mistral_window"])
def test_engine_greedy_tokens_match_reference_backend(tiny_model, family: str, kv_cache_dtype: str) -> None:
    model = tiny_model(family)
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


@pytest.mark.parametrize("fmt", ["dynamic", "fp8-block"])
def test_triton_fp8_gemm_in_the_engine_matches_the_reference_path(tiny_model, tmp_path, fmt: str) -> None:
    """FP8 weights through Triton's activation quantization and FP8 GEMM (channel and 32-column block scales)."""
    from tests.engine.fp8_checkpoints import write_fp8_checkpoint

    model, kw = str(tiny_model("qwen2")), {"quantization": "fp8"}
    if fmt != "dynamic":
        write_fp8_checkpoint(tiny_model("qwen2"), tmp_path / "m", fmt)
        model, kw = str(tmp_path / "m"), {}
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = [list(range(3, 40)), [9, 8, 7]]
    outs = {}
    for gemm in ("reference", "triton"):
        llm = LLM(model, fp8_gemm_backend=gemm, **kw)
        assert llm.core.runner.model.model.layers[0].mlp.down_proj.gemm == gemm
        outs[gemm] = [o.outputs[0] for o in llm.generate(prompts, params)]
    for ref, got in zip(outs["reference"], outs["triton"], strict=True):
        assert got.token_ids == ref.token_ids
        assert all(abs(a.logprob - b.logprob) < 1e-3 for a, b in zip(ref.logprobs, got.logprobs, strict=True))
