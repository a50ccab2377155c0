"""Prompt logprobs come from the prefill that runs anyway: equal to a full forward's, over chunks, across
preemption, without prefix-cache hits for the request that asks (others keep theirs); max_tokens 0 computes
the prompt alone."""

from __future__ import annotations

import pytest
import torch
from kvpilot.engine import LLM, SamplingParams
from kvpilot.engine.demo import ensure_demo_model
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

PROMPT = list(range(3, 80))


@pytest.fixture(scope="module")
def reference() -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(ensure_demo_model()).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)
    return [logprobs[i - 1, PROMPT[i]].item() for i in range(1, len(PROMPT))]


def _engine(**kw: object) -> LLM:
    return LLM("demo", device="cpu", max_model_len=512, **{"num_kv_blocks": 64, "max_num_batched_tokens": 16, **kw})


def test_equal_to_a_full_forward_over_chunks(reference: list[float]) -> None:
    llm = _engine()
    for max_tokens in (0, 4):
        out = llm.generate([PROMPT], SamplingParams(max_tokens=max_tokens, temperature=0.0, prompt_logprobs=3))[0]
        lps = out.prompt_logprobs
        assert lps is not None and len(lps) == len(PROMPT) and lps[0] is None
        assert [lp.token_id for lp in lps[1:]] == PROMPT[1:]
        assert max(abs(lp.logprob - ref) for lp, ref in zip(lps[1:], reference, strict=True)) < 1e-4
        for lp in lps[1:]:
            assert len(lp.top) == 3 and max(lp.top.values()) >= lp.logprob - 1e-6
        assert len(out.outputs[0].token_ids) == max_tokens
        assert out.outputs[0].finish_reason == "length"
    assert llm.core.stats().num_free_blocks == llm.core.stats().num_total_blocks


def test_the_asking_request_skips_the_prefix_cache_and_others_keep_it(reference: list[float]) -> None:
    llm = _engine()
    llm.generate([PROMPT], SamplingParams(max_tokens=2))
    plain = llm.generate([PROMPT], SamplingParams(max_tokens=2))[0]
    asking = llm.generate([PROMPT], SamplingParams(max_tokens=2, prompt_logprobs=0))[0]
    assert plain.metrics.num_cached_tokens > 0
    assert asking.metrics.num_cached_tokens == 0
    assert max(abs(lp.logprob - ref) for lp, ref in zip(asking.prompt_logprobs[1:], reference, strict=True)) < 1e-4


def test_each_position_once_across_preemption(reference: list[float]) -> None:
    llm = _engine(num_kv_blocks=12, max_num_batched_tokens=24)
    noise = SamplingParams(max_tokens=60, ignore_eos=True, temperature=0.0)
    asking = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0, prompt_logprobs=1)
    outs = llm.generate([[5] * 40, PROMPT, [7] * 50], [noise, asking, noise])
    assert llm.core.stats().num_preemptions > 0
    lps = outs[1].prompt_logprobs
    assert len(lps) == len(PROMPT)
    assert max(abs(lp.logprob - ref) for lp, ref in zip(lps[1:], reference, strict=True)) < 1e-4


def test_prompt_only_takes_one_sample() -> None:
    with pytest.raises(ValidationError, match="n must be 1"):
        SamplingParams(max_tokens=0, n=2)
