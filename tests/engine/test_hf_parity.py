"""Greedy outputs token-for-token equal to transformers' generate(), in every scheduling regime: dense families,
the mixture-of-experts families, and a Mistral whose sliding window is shorter than every prompt it is given."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from kvpilot.engine import LLM, SamplingParams
from kvpilot.engine.request import Sequence
from transformers import AutoModelForCausalLM

from tests.engine.hf_reference import hf_greedy

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mistral_window", "mixtral", "qwen2_moe", "qwen3_moe"]
MAX_TOKENS = 10
WINDOWS = {"mistral_window": 20}  # tests/conftest.py's window: every prompt of that family is longer
LENGTHS = [1, 2, 3, 5, 8, 15, 16, 17, 20, 31, 32, 33, 40, 47, 50, 70]


def _prompts(shared_prefix: bool, longer_than: int = 0) -> list[list[int]]:
    """16 prompts of mixed lengths, each past `longer_than` tokens (a sliding window) when given."""
    rng = random.Random(7)
    prefix = [rng.randrange(1, 512) for _ in range(37)]
    prompts = []
    for n in LENGTHS:
        tail = [rng.randrange(1, 512) for _ in range(n + longer_than)]
        prompts.append(prefix + tail if shared_prefix else tail)
    return prompts


SETTINGS = {
    "default": {},
    "chunk16": {"max_num_batched_tokens": 16},
    "prefix": {"enable_prefix_caching": True, "max_num_seqs": 4},
    "preempt": {"num_kv_blocks": 12, "max_num_batched_tokens": 64},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_matches_transformers(tiny_model, family: str, setting: str) -> None:
    model_dir: Path = tiny_model(family)
    prompts = _prompts(shared_prefix=setting == "prefix", longer_than=WINDOWS.get(family, 0))
    expected = hf_greedy(str(model_dir), tuple(map(tuple, prompts)), MAX_TOKENS)
    llm = LLM(str(model_dir), **SETTINGS[setting])
    released = _count_released(llm)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    got = [o.outputs[0].token_ids for o in outputs]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"prompt {i} (len {len(prompts[i])}): engine {g} != transformers {e}"
    stats = llm.core.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    if setting == "prefix":
        assert stats.prefix_cache_hits > 0
    if setting == "preempt":
        assert stats.num_preemptions > 0, "the small pool was meant to force preemption"
    if llm.core.kv.window is not None:
        assert released[0] > 0, "blocks behind the window were meant to go back while sequences ran"


def _count_released(llm: LLM) -> list[int]:
    """A running count of the blocks the pool gives back behind a sliding window."""
    kv, count = llm.core.kv, [0]
    release = kv.release_outside_window

    def counted(seq: Sequence) -> int:
        n = release(seq)
        count[0] += n
        return n

    kv.release_outside_window = counted  # type: ignore[method-assign]
    return count


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_reference_logits(tiny_model, family: str) -> None:
    model_dir = tiny_model(family)
    prompts = _prompts(shared_prefix=False)[:6]
    llm = LLM(str(model_dir))
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        sample = out.outputs[0]
        full = torch.tensor([prompt + sample.token_ids])
        with torch.no_grad():
            ref = torch.log_softmax(hf(full).logits[0].float(), dim=-1)
        for step, lp in enumerate(sample.logprobs or []):
            row = ref[len(prompt) - 1 + step]
            assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
            assert len(lp.top) == 5
            for tok, value in lp.top.items():
                assert abs(value - row[tok].item()) < 1e-4
            assert set(lp.top) == set(row.topk(5).indices.tolist())
