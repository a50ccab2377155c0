"""Scheduling decisions, observed step by step on a real engine core."""

from __future__ import annotations

import pytest
from kvpilot.engine import LLM, SamplingParams


@pytest.fixture
def core(tiny_model) -> LLM:
    return LLM(str(tiny_model("llama")), max_num_batched_tokens=16, max_num_seqs=3)


def test_chunked_prefill_mixes_decodes_and_a_chunk(core: LLM) -> None:
    core.add_request([1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True), request_id="short")
    core.step()  # the short prompt is prefilled and now decodes
    core.add_request(list(range(1, 60)), SamplingParams(max_tokens=2, ignore_eos=True), request_id="long")
    plan = core.core.scheduler.schedule()
    sizes = {seq.request.request_id: n for seq, n in plan.scheduled}
    assert sizes == {"short": 1, "long": 15}, "one decode token plus a 15-token chunk fill the 16-token budget"


def test_fcfs_and_max_num_seqs(core: LLM) -> None:
    for i in range(5):
        core.add_request([i + 1, 2], SamplingParams(max_tokens=4, ignore_eos=True), request_id=f"r{i}")
    plan = core.core.scheduler.schedule()
    assert [s.request.request_id for s, _ in plan.scheduled] == ["r0", "r1", "r2"]
    assert [s.request.request_id for s in core.core.scheduler.waiting] == ["r3", "r4"]


def test_preempted_request_resumes_with_same_output(tiny_model) -> None:
    model = str(tiny_model("llama"))
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=30, ignore_eos=True)
    expected = LLM(model).generate([list(range(1, 20))], params)[0].outputs[0].token_ids
    tight = LLM(model, num_kv_blocks=5)
    tight.add_request(list(range(1, 20)), params, request_id="a")
    tight.add_request(list(range(30, 45)), params, request_id="b")
    done = {}
    while tight.core.has_unfinished:
        for out in tight.step():
            if out.finished:
                done[out.request_id] = out
    assert tight.core.stats().num_preemptions > 0
    assert done["a"].outputs[0].token_ids == expected
    assert done["a"].metrics.num_preemptions + done["b"].metrics.num_preemptions > 0


def test_requests_sharing_a_prefix_wait_for_it_instead_of_recomputing(tiny_model) -> None:
    core = LLM(str(tiny_model("llama")), max_num_batched_tokens=256)
    prefix = list(range(1, 65))  # four full blocks
    for i in range(4):
        core.add_request([*prefix, 100 + i, 7], SamplingParams(max_tokens=3, ignore_eos=True), request_id=f"r{i}")
    first = core.core.scheduler.schedule()
    assert [s.request.request_id for s, _ in first.scheduled] == ["r0"], "the others wait for r0's prefix"
    while core.core.has_unfinished:
        core.step()
    stats = core.core.stats()
    assert stats.prefix_cache_hits == 3 * 64


def _steps_until_first_token(core: LLM, request_id: str, limit: int = 500) -> int:
    for step in range(1, limit + 1):
        request = core.core.requests[request_id]
        core.step()
        if request.seqs[0].num_output_tokens:
            return step
    raise AssertionError(f"{request_id} got no token in {limit} steps")


def test_a_small_request_is_not_starved_by_n_128(tiny_model) -> None:
    """n=128 used to hold every sequence slot (FCFS) until its samples finished: 99 s for others."""
    core = LLM(str(tiny_model("llama")), max_num_seqs=8, max_num_batched_tokens=64)
    core.add_request(list(range(1, 20)), SamplingParams(n=128, max_tokens=32, ignore_eos=True), request_id="big")
    core.step()
    core.step()
    core.add_request([7, 8, 9], SamplingParams(max_tokens=2, ignore_eos=True), request_id="small")
    assert _steps_until_first_token(core, "small") <= 3
    big_running = sum(1 for s in core.core.requests["big"].seqs if s.status.value == "running")
    assert big_running <= core.core.scheduler.seq_share
    core.abort("big")
    while core.core.has_unfinished:
        core.step()
    assert core.core.kv.num_free_blocks == core.core.kv.num_blocks


def test_alone_a_request_may_use_every_slot(tiny_model) -> None:
    core = LLM(str(tiny_model("llama")), max_num_seqs=8, max_num_batched_tokens=64)
    core.add_request(list(range(1, 20)), SamplingParams(n=16, max_tokens=8, ignore_eos=True), request_id="big")
    for _ in range(3):
        core.step()
    assert len(core.core.scheduler.running) == 8


def test_a_long_prompt_leaves_room_for_a_waiting_one(tiny_model) -> None:
    core = LLM(str(tiny_model("llama")), max_num_batched_tokens=64)
    core.add_request(list(range(1, 400)), SamplingParams(max_tokens=2, ignore_eos=True), request_id="long")
    core.add_request([3, 4, 5], SamplingParams(max_tokens=2, ignore_eos=True), request_id="short")
    plan = core.core.scheduler.schedule()
    sizes = {seq.request.request_id: n for seq, n in plan.scheduled}
    assert sizes == {"long": core.core.scheduler.token_share, "short": 3}
