"""Concurrency, client disconnects and overload, checked through the engine's block accounting."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from tests.server.conftest import RunningServer, serve, stream_completion


async def test_64_concurrent_streams(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                 limits=httpx.Limits(max_connections=100)) as client:
        results = await asyncio.gather(*(stream_completion(client, 8, [3 + i, 4, 5, 6 + i]) for i in range(64)))
    assert all(r["status"] == 200 and r["done"] and not r["errors"] for r in results)
    assert all(r["tokens"] == 8 for r in results)
    assert all(r["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12} for r in results)
    server.wait_idle()


async def test_client_disconnect_frees_blocks(server: RunningServer) -> None:
    body = {"model": "demo", "prompt": list(range(3, 40)), "max_tokens": 200, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client, \
            client.stream("POST", "/v1/completions", json=body) as r:
        chunks = 0
        async for line in r.aiter_lines():
            chunks += line.startswith("data: ")
            if chunks == 3:
                break
        stats = server.engine.stats()
        assert stats.num_running == 1 and stats.num_free_blocks < stats.num_total_blocks
    # 200 tokens would take far longer than the idle wait; the abort frees the blocks at once.
    server.wait_idle(timeout_s=3.0)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'kvpilot:request_success_total{finished_reason="abort"' in metrics


def test_non_streaming_disconnect_frees_blocks(server: RunningServer) -> None:
    body = {"model": "demo", "prompt": list(range(3, 40)), "max_tokens": 200, "ignore_eos": True}
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=0.3)
    server.wait_idle(timeout_s=3.0)


async def test_overload_refused_fast_and_accepted_complete() -> None:
    queue_bound = 4
    with serve(max_waiting_requests=queue_bound, max_num_seqs=2) as own:
        most_waiting = 0

        async def watch() -> None:
            nonlocal most_waiting
            while True:
                most_waiting = max(most_waiting, own.engine.stats().num_waiting)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        async with httpx.AsyncClient(base_url=own.url, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as client:
            results = await asyncio.gather(*(stream_completion(client, 24, [5, 6, 7, i + 3]) for i in range(40)))
        watcher.cancel()
        assert most_waiting <= queue_bound
        accepted = [r for r in results if r["status"] == 200]
        refused = [r for r in results if r["status"] != 200]
        assert refused and accepted
        assert {r["status"] for r in refused} == {429}
        assert all(r["retry_after"] == "1" and r["error"]["type"] == "rate_limit_error" for r in refused)
        assert max(r["first_byte_s"] for r in refused) < 2.0  # refused at once, not after queueing
        assert all(r["done"] and not r["errors"] and r["tokens"] == 24 for r in accepted)
        own.wait_idle()
