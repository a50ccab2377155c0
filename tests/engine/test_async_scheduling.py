"""Async scheduling (the next step prepared while this one runs, samples fed back on the device) changes no
output: greedy and seeded sampling give the same tokens and logprobs with it on and off, through chunked
prefill, preemption, n > 1, stop tokens and prefix caching."""

from __future__ import annotations

import logging
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvpilot.engine import LLM, SamplingParams
from kvpilot.engine.warm_up import warm_up

SHAPE = {"num_kv_blocks": 14, "max_num_batched_tokens": 24, "max_num_seqs": 4}


@pytest.fixture(scope="module")
def engines(tiny_model) -> dict[bool, LLM]:
    model = str(tiny_model("llama"))
    return {on: LLM(model, async_scheduling=on, **SHAPE) for on in (True, False)}


request_st = st.fixed_dictionaries({
    "prompt": st.lists(st.integers(1, 500), min_size=1, max_size=50),
    "max_tokens": st.integers(1, 14),
    "n": st.integers(1, 3),
    "temperature": st.sampled_from([0.0, 0.0, 0.7, 1.2]),
    "top_k": st.sampled_from([0, 5]),
    "top_p": st.sampled_from([1.0, 0.8]),
    "seed": st.integers(0, 1000),
    "stop_token": st.one_of(st.none(), st.integers(1, 500)),
    "logprobs": st.sampled_from([None, 0, 2]),
})


def _params(r: dict) -> SamplingParams:
    return SamplingParams(
        max_tokens=r["max_tokens"], n=r["n"], temperature=r["temperature"], top_k=r["top_k"], top_p=r["top_p"],
        seed=r["seed"], ignore_eos=True, stop_token_ids=[r["stop_token"]] if r["stop_token"] else [],
        logprobs=r["logprobs"],
    )


def _outputs(llm: LLM, requests: list[dict]) -> list[list[tuple]]:
    outs = llm.generate([r["prompt"] for r in requests], [_params(r) for r in requests])
    while llm.core.has_unfinished:  # the step still in flight holds nothing; drain it
        llm.step()
    stats = llm.core.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    return [[(tuple(o.token_ids), o.finish_reason, [lp.logprob for lp in o.logprobs or []]) for o in out.outputs]
            for out in outs]


def _same(a: list[list[tuple]], b: list[list[tuple]]) -> bool:
    """Tokens and finish reasons exactly; logprobs to fp32 matmul noise (batch shapes differ by a dropped row)."""
    return all(
        x[:2] == y[:2] and len(x[2]) == len(y[2]) and all(abs(p - q) < 1e-4 for p, q in zip(x[2], y[2], strict=True))
        for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(request_st, min_size=1, max_size=6))
def test_async_scheduling_changes_no_output(engines: dict[bool, LLM], requests: list[dict]) -> None:
    assert _same(_outputs(engines[True], requests), _outputs(engines[False], requests))


def test_async_pipeline_is_really_used(engines: dict[bool, LLM]) -> None:
    """The async engine launches a step before collecting the previous one; the sync one never does."""
    for on, llm in engines.items():
        llm.add_request([1, 2, 3], SamplingParams(max_tokens=6, ignore_eos=True))
        overlapped = 0
        while llm.core.has_unfinished:
            llm.step()
            overlapped += llm.core._in_flight is not None
        assert (overlapped > 0) is on


def test_penalties_run_synchronously_and_still_match(engines: dict[bool, LLM]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5,
                            frequency_penalty=0.5)
    got = {on: llm.generate([[4, 4, 4, 4]], params)[0].outputs[0].token_ids for on, llm in engines.items()}
    assert got[True] == got[False]


def test_warm_up_leaves_no_trace(tiny_model) -> None:
    """The CUDA start-up warm-up (every step kind and sampling path) resets the pool, cache and counters, and
    re-seeds the sampler, so what follows is as from a fresh engine."""
    model = str(tiny_model("llama"))
    prompts = [[1, 2, 3, 4], list(range(10, 60))]
    params = SamplingParams(temperature=0.9, max_tokens=10, ignore_eos=True)
    fresh = LLM(model, max_num_batched_tokens=32).generate(prompts, params)
    warmed = LLM(model, max_num_batched_tokens=32)
    warm_up(warmed.core)
    stats = warmed.core.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.prefix_cache_queries == 0
    assert stats.num_preemptions == 0 and not warmed.core.requests
    again = warmed.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in fresh]


def test_warm_up_of_a_model_without_a_tokenizer_fails_no_request(tiny_model, tmp_path, caplog) -> None:
    """Such a model takes no grammar (its requests get a clear error), so warm-up warms none: on the 8B benchmark
    shape it used to log a failed grammar request at every start."""
    model = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model("llama"), model, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    llm = LLM(str(model), max_num_batched_tokens=32)
    with caplog.at_level(logging.ERROR):
        warm_up(llm.core)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert not llm.core.requests and not llm.core.has_unfinished
