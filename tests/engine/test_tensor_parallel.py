"""Tensor parallelism on the CPU: two gloo ranks must generate what one rank generates."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from kvpilot.engine import LLM, SamplingParams

PROMPTS = [[1, 2, 3], list(range(5, 40)), [7] * 20, list(range(100, 190))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)


# qkv bias; tied embeddings + q/k norm + head_dim 32; routed experts split along their units, a gated shared
# expert and a dense layer (mlp_only_layers) between routed ones
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen2_moe"])
def test_two_ranks_match_one(tiny_model, family: str) -> None:
    model = str(tiny_model(family))
    single = LLM(model, max_num_batched_tokens=32).generate(PROMPTS, GREEDY)
    sharded_llm = LLM(model, tensor_parallel_size=2, max_num_batched_tokens=32)
    try:
        sharded = sharded_llm.generate(PROMPTS, GREEDY)
        workers = list(sharded_llm.core.workers.procs)
        assert len(workers) == 1 and workers[0].is_alive()
    finally:
        sharded_llm.core.close()
    for a, b in zip(single, sharded, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert abs(x.logprob - y.logprob) < 1e-4
    assert not workers[0].is_alive(), "closing the engine stops its workers"
    assert not [c for c in mp.active_children() if c.name.startswith("kvpilot-tp")]


def test_indivisible_heads_are_named(tiny_model) -> None:
    with pytest.raises(ValueError, match="num_attention_heads"):
        LLM(str(tiny_model("llama")), tensor_parallel_size=3)
