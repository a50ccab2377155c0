"""The asyncio front: streaming outputs, aborts that free blocks at once, overload refusal."""

from __future__ import annotations

import asyncio

import pytest
from kvpilot.engine import AsyncEngine, EngineConfig, SamplingParams
from kvpilot.engine.errors import EngineOverloaded


@pytest.fixture
async def engine(tiny_model):
    eng = AsyncEngine(EngineConfig(model=str(tiny_model("llama")), max_num_seqs=4), max_waiting_requests=3)
    await eng.start()
    yield eng
    await eng.shutdown()


async def test_streams_grow_and_finish(engine: AsyncEngine) -> None:
    stream = await engine.add_request([1, 2, 3], SamplingParams(max_tokens=6, ignore_eos=True))
    outs = [list(out.outputs[0].token_ids) async for out in stream]
    # Outputs are cumulative; a consumer that lags takes the newest at once (AsyncStream._latest), so
    # steps may be skipped, but every output extends the one before and the last holds all six tokens.
    lengths = [len(ids) for ids in outs]
    assert lengths == sorted(set(lengths)) and lengths[-1] == 6
    assert all(outs[-1][: len(ids)] == ids for ids in outs)


async def test_concurrent_requests_and_abort_frees_blocks(engine: AsyncEngine) -> None:
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    streams = [await engine.add_request([i + 1] * 40, params) for i in range(3)]
    first = await streams[0].__aiter__().__anext__()
    assert not first.finished
    await engine.abort(streams[1].request_id)
    async for out in streams[1]:
        last = out
    assert last.finished and last.outputs[0].finish_reason == "abort"
    # A consumer that stops iterating (client disconnect) aborts its request too.
    it = streams[2].__aiter__()
    await it.__anext__()
    await it.aclose()
    await engine.abort(streams[0].request_id)
    for _ in range(50):
        if engine.stats().num_free_blocks == engine.stats().num_total_blocks:
            break
        await asyncio.sleep(0.01)
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0


async def test_waiting_queue_bound_refuses(engine: AsyncEngine) -> None:
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    refused = 0
    streams = []
    for i in range(12):
        try:
            streams.append(await engine.add_request([i + 1, 2], params))
        except EngineOverloaded:
            refused += 1
    assert refused > 0
    for s in streams:
        outs = [out async for out in s]
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length"


async def test_burst_during_a_step_respects_the_bound(engine: AsyncEngine) -> None:
    """Submissions that queue behind a running step count against the bound too."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    busy = [await engine.add_request([i + 1] * 30, params) for i in range(3)]  # keep the loop stepping
    results = await asyncio.gather(
        *(engine.add_request([9, i + 1], params) for i in range(20)), return_exceptions=True
    )
    accepted = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, EngineOverloaded) for r in results if isinstance(r, BaseException))
    assert engine.stats().num_waiting <= engine.max_waiting_requests
    assert len(accepted) <= engine.max_waiting_requests
    for stream in busy + accepted:
        outs = [out async for out in stream]
        assert outs[-1].finished


async def test_a_lagging_consumer_gets_queued_outputs_as_one() -> None:
    """Outputs are cumulative: a stream whose reader fell behind yields the newest with the token counts
    summed, so the server writes one SSE event (one send) instead of one per step."""
    from kvpilot.engine.async_engine import RequestStream
    from kvpilot.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput

    def out(tokens: int, finished: bool = False) -> RequestOutput:
        return RequestOutput("r", None, [1], [CompletionOutput(0, list(range(tokens)), "x" * tokens)],
                             RequestMetrics(arrival_time=0.0), finished=finished, new_token_counts=[1])

    stream = RequestStream("r", engine=None)  # type: ignore[arg-type]
    for n in (1, 2, 3):
        stream.put(out(n))
    stream.put(out(4, finished=True))
    got = [o async for o in stream]
    assert [len(o.outputs[0].token_ids) for o in got] == [4]
    assert got[0].finished and got[0].new_token_counts == [4]
