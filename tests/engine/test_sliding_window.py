"""Sliding-window attention end to end: the pool gives back blocks behind the window while a sequence runs,
requests longer than the pool are served, prefix hits need only the window's blocks, and nothing leaks."""

from __future__ import annotations

import pytest
from kvpilot.engine import LLM, SamplingParams
from kvpilot.engine.errors import RequestRejected
from kvpilot.engine.kv_cache import KVCacheManager
from kvpilot.engine.models.arch import parse_arch
from kvpilot.engine.outputs import RequestMetrics
from kvpilot.engine.request import Request, Sequence

from tests.engine.hf_reference import hf_greedy

WINDOW, BLOCK = 20, 16  # tests/conftest.py's "mistral_window"
PROMPT = [(7 * i) % 500 + 1 for i in range(70)]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_a_long_generation_holds_a_bounded_number_of_blocks(tiny_model, async_scheduling: bool) -> None:
    model = str(tiny_model("mistral_window"))
    llm = LLM(model, max_num_batched_tokens=32, async_scheduling=async_scheduling)
    assert llm.config.max_model_len == 512, "the window no longer caps the context"
    bound = llm.core.kv.max_blocks_per_seq(32)
    assert bound == (WINDOW + 32 - 2) // BLOCK + 2
    llm.add_request(PROMPT, _greedy(200), request_id="long")
    held, out = [], None
    while llm.core.has_unfinished:
        for o in llm.step():
            out = o
        held.append(llm.core.kv.num_blocks - llm.core.kv.num_free_blocks)
    total_blocks = -(-(len(PROMPT) + 200) // BLOCK)
    assert max(held) <= bound < total_blocks, f"held {max(held)} blocks of the {total_blocks} the context spans"
    assert held[-1] == 0, "every block is back once the request ends"
    assert out is not None and out.outputs[0].token_ids == hf_greedy(model, (tuple(PROMPT),), 200)[0]


def test_a_request_longer_than_the_pool_is_served_under_the_window(tiny_model) -> None:
    """8 blocks hold 128 tokens; the request spans 270. A full-attention model must refuse it."""
    model = str(tiny_model("mistral_window"))
    llm = LLM(model, num_kv_blocks=8, max_num_batched_tokens=32)
    out = llm.generate([PROMPT], _greedy(200))[0]
    assert out.outputs[0].token_ids == hf_greedy(model, (tuple(PROMPT),), 200)[0]
    dense = LLM(str(tiny_model("mistral")), num_kv_blocks=8, max_num_batched_tokens=32)
    with pytest.raises(RequestRejected, match="KV blocks"):
        dense.generate([PROMPT], _greedy(200))


def test_prefix_hits_past_the_window_adopt_only_the_blocks_it_sees(tiny_model, monkeypatch) -> None:
    """The second request's first query sees only the last blocks of the shared prefix: the rest stay
    placeholders, unreferenced, and the output is unchanged."""
    model = str(tiny_model("mistral_window"))
    llm = LLM(model, enable_prefix_caching=True)
    kv = llm.core.kv
    adopted: list[tuple[int, int, list[int]]] = []
    share = kv.share

    def spy(seq: Sequence, block_ids: list[int]) -> None:
        share(seq, block_ids)
        adopted.append((len(block_ids), seq.num_released_blocks, [kv.blocks[b].ref_count for b in block_ids]))

    monkeypatch.setattr(kv, "share", spy)
    prompts = ((*PROMPT, 3), (*PROMPT, 9))
    outs = [llm.generate([list(p)], _greedy(4))[0].outputs[0].token_ids for p in prompts]
    assert outs == hf_greedy(model, prompts, 4)
    hit = len(PROMPT) // BLOCK  # the 4 full blocks of the shared 70 tokens
    released = (hit * BLOCK - WINDOW + 1) // BLOCK
    assert adopted[-1][:2] == (hit, released) == (4, 2)
    assert adopted[-1][2][released:] == [1] * (hit - released), "only the blocks the window sees are taken"
    stats = llm.core.stats()
    assert stats.prefix_cache_hits == hit * BLOCK and stats.num_free_blocks == stats.num_total_blocks


def test_a_hit_survives_the_eviction_of_blocks_behind_the_window() -> None:
    """Only the blocks holding the window's keys need to be cached, as in vLLM's sliding-window manager."""
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=True, window=6)
    owner = _seq(list(range(1, 30)))
    kv.allocate(owner, 28)
    owner.num_computed_tokens = 28
    kv.cache_full_blocks(owner)
    table = list(owner.block_table)
    kv.free_seq(owner)
    for block_id in reversed(table[:3]):  # make the owner's first three blocks the next to be evicted
        kv.free.move_to_end(block_id, last=False)
    assert [kv._pop_free() for _ in range(3)] == table[:3]
    reader = _seq(list(range(1, 30)))
    hit = kv.find_cached_prefix(reader)
    assert len(hit) == 7 and kv.released_in_hit(7) == 5, "keys 23..27 live in blocks 5 and 6"
    assert kv.can_allocate(reader, 1, hit)
    kv.share(reader, hit)
    assert reader.num_released_blocks == 5 and reader.num_computed_tokens == 28
    kv.free_seq(reader)
    assert kv.num_free_blocks == 7  # the three evicted ones are popped, never given back


@pytest.mark.parametrize("chunk", [8192, 16])
def test_a_model_mixing_windowed_and_full_layers_matches_transformers(tiny_model, chunk: int) -> None:
    """Qwen2 with use_sliding_window: layer 1 slides, layer 0 does not, so every block stays."""
    model = str(tiny_model("qwen2_window"))
    prompts = [PROMPT[:n] for n in (3, 19, 20, 21, 40, 70)]
    llm = LLM(model, max_num_batched_tokens=chunk)
    assert llm.core.runner.model.model.layers[1].self_attn.window == WINDOW and llm.core.kv.window is None
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, _greedy(12))]
    assert outs == hf_greedy(model, tuple(map(tuple, prompts)), 12)


def test_windows_follow_transformers_layer_rules() -> None:
    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=4, num_attention_heads=2)
    mistral = parse_arch({**base, "model_type": "mistral", "sliding_window": 4096})
    assert mistral.layer_windows == (4096,) * 4 and mistral.kv_window == 4096
    qwen2 = parse_arch({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64,
                        "max_window_layers": 2})
    assert qwen2.layer_windows == (None, None, 64, 64) and qwen2.kv_window is None, "full layers keep every block"
    typed = parse_arch({**base, "model_type": "qwen3", "use_sliding_window": True, "sliding_window": 64,
                        "layer_types": ["sliding_attention", "full_attention"] * 2})
    assert typed.layer_windows == (64, None, 64, None)
    off = parse_arch({**base, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 64})
    assert off.layer_windows == (None,) * 4
    with pytest.raises(ValueError, match="layer_types"):
        parse_arch({**base, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
                    "layer_types": ["full_attention"]})


def _seq(tokens: list[int]) -> Sequence:
    request = Request("r", tokens, _greedy(1), RequestMetrics(arrival_time=0.0))
    return Sequence(request, 0, list(tokens), len(tokens))
