"""Concurrency, client disconnects and overload; disconnects are judged as a client can: /metrics only."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import RunningServer, serve, stream_completion


async def test_64_concurrent_streams(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                 limits=httpx.Limits(max_connections=100)) as client:
        results = await asyncio.gather(*(stream_completion(client, 8, [3 + i, 4, 5, 6 + i]) for i in range(64)))
    assert all(r["status"] == 200 and r["done"] and not r["errors"] for r in results)
    assert all(r["tokens"] == 8 for r in results)
    assert all(r["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12} for r in results)
    server.wait_idle()


@pytest.fixture(scope="module")
def roomy() -> Iterator[RunningServer]:
    """Room for a generation far longer than any wait below: a disconnect that is not acted on shows."""
    with serve(max_model_len=2048, num_kv_blocks=160) as running:
        yield running


def scrape(url: str) -> dict[str, float]:
    """What a client sees of the engine: /metrics, summed by sample name and finish reason."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            key = sample.name + (f":{sample.labels['finished_reason']}" if "finished_reason" in sample.labels else "")
            out[key] = out.get(key, 0.0) + sample.value
    return out


def wait_pool_empty(url: str, timeout_s: float) -> dict[str, float]:
    """Every request gone and every KV block free again, read through /metrics, or fail saying what is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(url)
        running, free, total = (m[f"kvpilot:{k}"] for k in ("num_requests_running", "num_free_kv_blocks",
                                                             "num_total_kv_blocks"))
        if running == 0 and free == total:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle {timeout_s} s after the client left: {running} running, {free} of "
                                 f"{total} KV blocks free")
        time.sleep(0.05)


ABORTED = "kvpilot:request_success_total:abort"
LONG = {"model": "demo", "prompt": list(range(3, 40)), "max_tokens": 2000, "ignore_eos": True}  # > 10 s on CPU


async def test_client_disconnect_aborts_the_stream_and_frees_blocks(roomy: RunningServer) -> None:
    before = scrape(roomy.url).get(ABORTED, 0.0)
    async with httpx.AsyncClient(base_url=roomy.url, timeout=30) as client, \
            client.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        chunks = 0
        async for line in r.aiter_lines():
            chunks += line.startswith("data: ")
            if chunks == 3:
                break
        busy = scrape(roomy.url)
        assert busy["kvpilot:num_requests_running"] == 1
        assert busy["kvpilot:num_free_kv_blocks"] < busy["kvpilot:num_total_kv_blocks"]
    after = wait_pool_empty(roomy.url, timeout_s=3.0)  # 2,000 tokens take far longer: only an abort frees them
    assert after[ABORTED] == before + 1


def test_non_streaming_disconnect_aborts_and_frees_blocks(roomy: RunningServer) -> None:
    before = scrape(roomy.url).get(ABORTED, 0.0)
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(f"{roomy.url}/v1/completions", json=LONG, timeout=0.5)
    after = wait_pool_empty(roomy.url, timeout_s=3.0)
    assert after[ABORTED] == before + 1


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
