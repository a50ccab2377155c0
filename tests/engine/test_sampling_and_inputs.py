"""Sampling semantics per request, and the errors bad inputs get."""

from __future__ import annotations

import pytest
from kvpilot.engine import LLM, EngineConfig, RequestRejected, SamplingParams
from pydantic import ValidationError


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(str(tiny_model("llama")), max_num_batched_tokens=32)


def test_seeded_sampling_ignores_batch_composition(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=12, ignore_eos=True)
    alone = llm.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.3, max_tokens=9, ignore_eos=True)
    batch = [[1, 2, 3], [5, 6, 7, 8], [9] * 30, [4, 4]]
    crowded = llm.generate(batch, [noise, params, noise, noise])[1].outputs[0].token_ids
    assert alone == crowded
    other_seed = llm.generate([[5, 6, 7, 8]], params.model_copy(update={"seed": 43}))[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples_share_the_prompt_blocks(llm: LLM) -> None:
    prompt = list(range(1, 50))  # three full blocks
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    core = llm.core
    request = core.requests[llm.add_request(prompt, params)]
    shared_seen = False
    final = []
    while core.has_unfinished:
        final += llm.step()
        tables = [s.block_table for s in request.seqs if s.block_table]
        if len(tables) > 1:
            shared_seen |= all(t[:3] == tables[0][:3] for t in tables)
    assert shared_seen, "samples did not share the prompt's blocks"
    outs = [o.token_ids for o in final[0].outputs]
    assert all(len(o) == 8 for o in outs)
    assert len({tuple(o) for o in outs}) > 1, "independent samples should differ"
    assert core.stats().num_free_blocks == core.stats().num_total_blocks


def test_stop_strings_cut_the_text(llm: LLM) -> None:
    base = llm.generate(["The scheduler"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    text = base.outputs[0].text
    stop = text[5:8]
    out = llm.generate(["The scheduler"], SamplingParams(temperature=0, max_tokens=20, stop=[stop], ignore_eos=True))
    sample = out[0].outputs[0]
    assert sample.finish_reason == "stop" and sample.stop_reason == stop
    assert sample.text == text[: text.index(stop)]


def test_stop_token_ids_and_max_tokens(llm: LLM) -> None:
    base = llm.generate([[3, 1, 4]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 8
    target = base.token_ids[3]
    out = llm.generate([[3, 1, 4]], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[target]))
    cut = out[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == target
    assert cut.token_ids == base.token_ids[: base.token_ids.index(target) + 1]


def test_min_tokens_blocks_early_stop(llm: LLM) -> None:
    base = llm.generate([[3, 1, 4]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    first = base.token_ids[0]
    out = llm.generate([[3, 1, 4]], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first], min_tokens=4))
    assert len(out[0].outputs[0].token_ids) >= 4
    assert first not in out[0].outputs[0].token_ids[:4]


def test_penalties_and_filters_change_the_distribution(llm: LLM) -> None:
    prompt = [[2, 2, 2, 2]]
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    penal = llm.generate(
        prompt,
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0),
    )[0].outputs[0]
    assert len(set(penal.token_ids)) >= len(set(greedy.token_ids))
    assert penal.token_ids != greedy.token_ids or len(set(greedy.token_ids)) == 16
    top1 = llm.generate(prompt, SamplingParams(temperature=1.0, top_k=1, max_tokens=8, ignore_eos=True, seed=1))
    assert top1[0].outputs[0].token_ids == greedy.token_ids[:8], "top_k=1 is greedy"
    tiny_p = llm.generate(prompt, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8, ignore_eos=True, seed=1))
    assert tiny_p[0].outputs[0].token_ids == greedy.token_ids[:8], "top_p near 0 keeps only the top token"
    min_p = llm.generate(prompt, SamplingParams(temperature=1.0, min_p=1.0, max_tokens=8, ignore_eos=True, seed=1))
    assert min_p[0].outputs[0].token_ids == greedy.token_ids[:8], "min_p=1 keeps only the top token"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        SamplingParams(**kwargs)
    assert field in str(err.value)


def test_bad_engine_config_names_the_field() -> None:
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        EngineConfig(model="demo", gpu_memory_utilization=1.5)
    with pytest.raises(ValidationError, match="max_num_seqs"):
        EngineConfig(model="demo", max_num_seqs=0)


def test_missing_model_path() -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        LLM("/tmp/does-not-exist-kvpilot")


def test_empty_prompt_and_overflow_are_rejected_at_once(llm: LLM) -> None:
    with pytest.raises(RequestRejected, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(RequestRejected, match=r"512 tokens.*500 in the prompt \+ 20 max_tokens"):
        llm.generate([[1] * 500], SamplingParams(max_tokens=20))
    with pytest.raises(RequestRejected, match=r"\[0, 512\)"):
        llm.generate([[1, 9999]], SamplingParams())
    assert not llm.core.has_unfinished


def test_request_larger_than_pool_is_rejected(tiny_model) -> None:
    small = LLM(str(tiny_model("llama")), num_kv_blocks=4)
    with pytest.raises(RequestRejected, match="whole pool holds 4"):
        small.add_request([1] * 60, SamplingParams(max_tokens=10))
    small.add_request([1] * 50, SamplingParams(max_tokens=10))  # 59 tokens of KV: fits exactly
