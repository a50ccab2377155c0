"""Property-based tests over random request mixes: no leaks, sane ref counts, budgets kept, caching invisible."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvpilot.engine import LLM, SamplingParams

BUDGET = 24


@pytest.fixture(scope="module")
def cores(tiny_model) -> dict[bool, LLM]:
    """One engine with prefix caching and one without, reused across examples (they must end idle)."""
    model = str(tiny_model("llama"))
    cores = {
        caching: LLM(
            model, num_kv_blocks=20, max_num_batched_tokens=BUDGET, max_num_seqs=5, enable_prefix_caching=caching
        )
        for caching in (True, False)
    }
    for llm in cores.values():
        _check_budget(llm)
    return cores


request_st = st.fixed_dictionaries(
    {
        "prompt": st.lists(st.integers(1, 40), min_size=1, max_size=60),
        "max_tokens": st.integers(1, 12),
        "n": st.integers(1, 3),
        "abort_after": st.one_of(st.none(), st.integers(0, 6)),
    }
)


def _run(llm: LLM, requests: list[dict]) -> dict[str, list[list[int]]]:
    ids = []
    for i, r in enumerate(requests):
        params = SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], n=r["n"], ignore_eos=True)
        ids.append(llm.add_request(r["prompt"], params, request_id=f"r{i}"))
    results: dict[str, list[list[int]]] = {}
    steps = 0
    while llm.core.has_unfinished:
        for out in llm.step():
            if out.finished:
                results[out.request_id] = [o.token_ids for o in out.outputs]
        steps += 1
        for i, r in enumerate(requests):
            if r["abort_after"] == steps and f"r{i}" in llm.core.requests:
                out = llm.abort(f"r{i}")
                assert out is not None and out.finished
                results[f"r{i}"] = [o.token_ids for o in out.outputs]
        check_ref_counts(llm)
        assert steps < 2000, "engine made no progress"
    assert set(results) == set(ids), "every request ends with a final output"
    return results


def _check_budget(llm: LLM) -> None:
    """Wrap the scheduler so every step it plans is checked against the budget and the cap."""
    original = llm.core.scheduler.schedule

    def checked():
        out = original()
        assert out.num_batched_tokens <= BUDGET
        assert len(llm.core.scheduler.running) <= llm.config.max_num_seqs
        return out

    llm.core.scheduler.schedule = checked  # type: ignore[method-assign]


def check_ref_counts(llm: LLM) -> None:
    held: dict[int, int] = {}
    for seq in llm.core.scheduler.running + list(llm.core.scheduler.waiting):
        for b in seq.block_table:
            held[b] = held.get(b, 0) + 1
    for block in llm.core.kv.blocks:
        assert block.ref_count >= 0
        assert block.ref_count == held.get(block.block_id, 0)
        assert (block.ref_count == 0) == (block.block_id in llm.core.kv.free)
    kv = llm.core.kv
    assert kv.num_empty_blocks == sum(kv.blocks[b].block_hash is None for b in kv.free), "the router's room"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(request_st, min_size=1, max_size=8))
def test_random_mixes_leave_no_leaks(cores: dict[bool, LLM], requests: list[dict]) -> None:
    for llm in cores.values():
        _run(llm, requests)
        stats = llm.core.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
        assert not llm.core.scheduler.running and not llm.core.scheduler.waiting


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(request_st, min_size=1, max_size=6))
def test_prefix_caching_does_not_change_outputs(cores: dict[bool, LLM], requests: list[dict]) -> None:
    for r in requests:
        r["abort_after"] = None
    shared = [7, 3, 9, 1] * 5  # a common prefix, so the cache is actually hit
    for r in requests:
        r["prompt"] = shared + r["prompt"]
    with_cache = _run(cores[True], requests)
    without = _run(cores[False], requests)
    assert with_cache == without
