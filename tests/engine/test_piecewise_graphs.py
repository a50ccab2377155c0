"""The piecewise split of the forward (segments between attentions, static buffers) computes what the model's
own forward does; on CUDA the same segments are captured as graphs and replayed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvpilot.engine import LLM
from kvpilot.engine.piecewise_graphs import PiecewiseGraphs, bucket_sizes
from kvpilot.engine.request import Sequence


# qwen3: q/k norms inside the captured segment; qwen2_moe: routing, experts and the gated shared expert inside
# it; mistral_window: the window passed to the attention between segments
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2_moe", "mistral_window"])
def test_segments_match_the_forward_on_a_mixed_step(tiny_model, family: str) -> None:
    llm = LLM(str(tiny_model(family)), max_num_batched_tokens=64)
    runner = llm.core.runner
    llm.add_request(list(range(1, 30)), _greedy(), request_id="decoding")
    for _ in range(3):
        llm.step()
    llm.add_request(list(range(40, 61)), _greedy(), request_id="prefilling")
    plan = llm.core.scheduler.schedule()
    assert {n for _, n in plan.scheduled} == {1, 21}, "one decode row and one prefill chunk"
    _fill_placeholders(plan.scheduled)
    inputs, _ = runner.prepare(plan.scheduled)
    meta = runner._metadata(inputs.query_lens, inputs.seq_lens, inputs.tables, inputs.slots)
    ids, pos = torch.from_numpy(inputs.ids), torch.from_numpy(inputs.positions)
    k_before = runner.k_cache.clone()
    expected = runner.model(ids, pos, runner.kv_caches, meta)
    runner.k_cache.copy_(k_before)  # both paths store the step's K/V: start them from the same cache
    got = PiecewiseGraphs(runner.model, 48).run_eager(ids, pos, runner.kv_caches, meta)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_buckets_cover_every_step_size() -> None:
    sizes = bucket_sizes(2048)
    assert sizes[0] == 16 and sizes[-1] == 2048 and sizes == sorted(sizes)
    assert bucket_sizes(100)[-1] == 96 and bucket_sizes(8) == [8]


def _greedy():
    from kvpilot.engine import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _fill_placeholders(scheduled: list[tuple[Sequence, int]]) -> None:
    """The decode row's input is still 'on the device' (async scheduling): give it a concrete id here."""
    for seq, _ in scheduled:
        for i, t in enumerate(seq.token_ids):
            if t < 0:
                seq.token_ids[i] = int(np.int64(5))
        seq.num_pending = 0
