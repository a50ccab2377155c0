"""The router's view of engines follows their events: stores route by prefix, evictions and restarts (a new
epoch: a snapshot) take entries away, engines without events fall back to hashing; load comes from /metrics."""

from __future__ import annotations

import httpx
from kvpilot.engine.block_hash import prefix_block_hashes
from kvpilot.engine.kv_events import KVEventLog
from kvpilot.router.backends import parse_engine_metrics

from tests.router.conftest import RunningRouter, eventually, router, stubs
from tests.router.stub import StubEngine

PROMPT = list(range(10, 90))  # four blocks the engine can serve from cache (the last token is always computed)
BLOCKS = prefix_block_hashes(PROMPT, 16)[:4]


async def _route(client: httpx.AsyncClient, url: str) -> tuple[str, str]:
    answer = await client.post(f"{url}/v1/completions", json={"model": "demo", "prompt": PROMPT, "max_tokens": 1})
    assert answer.status_code == 200
    return answer.headers["x-kvpilot-engine"], answer.headers["x-kvpilot-route"]


async def test_routes_follow_store_evict_and_restart(client: httpx.AsyncClient) -> None:
    async with stubs(3) as engines:
        for e in engines:
            e.kv = KVEventLog()
        async with router(engines, recent_route_ttl_s=0) as r:
            await _follow(client, r, engines)


async def _follow(client: httpx.AsyncClient, r: RunningRouter, engines: list[StubEngine]) -> None:
    """Store on one engine, evict its first block, store on another, restart that one: routes follow."""
    holder = engines[1]
    await eventually(lambda: all(s.events_synced for s in r.ctx.pool.states))
    assert holder.kv is not None
    for h in BLOCKS:
        holder.kv.stored(h)
    await eventually(lambda: r.ctx.pool.index.blocks_held(holder.name) == 4)
    assert await _route(client, r.url) == (holder.name, "prefix")
    assert r.metric("kvpilot:router_prefix_predicted_tokens_total") == 64

    holder.kv.evicted(BLOCKS[0])  # the prefix no longer starts there
    await eventually(lambda: r.ctx.pool.index.blocks_held(holder.name) == 3)
    assert (await _route(client, r.url))[1] == "hash"

    other = engines[2]
    assert other.kv is not None
    for h in BLOCKS:
        other.kv.stored(h)
    await eventually(lambda: r.ctx.pool.index.blocks_held(other.name) == 4)
    assert await _route(client, r.url) == (other.name, "prefix")
    other.kv = KVEventLog()  # the engine restarted: a new epoch, an empty cache
    await eventually(lambda: r.ctx.pool.index.blocks_held(other.name) == 0)
    assert (await _route(client, r.url))[1] == "hash"


async def test_a_new_prefix_goes_where_it_fits_without_evicting(client: httpx.AsyncClient) -> None:
    """Hashing alone could give one engine more prefixes than its pool holds while another's sits empty; the
    router's own routes count against an engine's room until its next /metrics read says what is left."""
    async with stubs(3) as engines:
        for e in engines:
            e.kv, e.empty_blocks = KVEventLog(), 8
        async with router(engines, recent_route_ttl_s=0, scrape_interval_s=0.2) as r:
            pool = r.ctx.pool
            states = {s.name: s for s in pool.states}
            await eventually(lambda: all(s.events_synced and s.free_blocks() == 8 for s in states.values()))
            owner_name, reason = await _route(client, r.url)
            assert reason == "hash"
            owner = next(e for e in engines if e.name == owner_name)
            assert states[owner_name].free_blocks() in (4, 8), "its four blocks count until the next read"

            owner.empty_blocks = 2  # the prompt's four do not fit there without evicting
            await eventually(lambda: states[owner_name].free_blocks() == 2)
            elsewhere, reason = await _route(client, r.url)
            assert reason == "hash" and elsewhere != owner.name
            for e in engines:
                e.empty_blocks = 0
            await eventually(lambda: all(s.free_blocks() == 0 for s in states.values()))
            assert await _route(client, r.url) == (owner.name, "hash"), "every pool full: the hash decides"


async def test_engines_without_events_are_routed_by_hash(client: httpx.AsyncClient) -> None:
    async with stubs(2) as engines, router(engines) as r:  # stubs without a log answer /kv/events with 404
        await eventually(lambda: all(s.load is not None for s in r.ctx.pool.states))
        assert not any(s.events_synced for s in r.ctx.pool.states)
        assert (await _route(client, r.url))[1] == "hash"


async def test_load_from_metrics_marks_a_queueing_engine_overloaded(client: httpx.AsyncClient) -> None:
    async with stubs(2) as engines, router(engines, max_waiting_per_engine=4) as r:
        engines[0].waiting = 4
        busy = next(s for s in r.ctx.pool.states if s.name == engines[0].name)
        await eventually(lambda: busy.load is not None and busy.load.waiting == 4)
        for i in range(6):
            body = {"model": "demo", "prompt": [i + 1] * 40, "max_tokens": 1}
            answer = await client.post(f"{r.url}/v1/completions", json=body)
            assert answer.headers["x-kvpilot-engine"] == engines[1].name
        assert r.metric("kvpilot:router_backends", state="overloaded") == 1


def test_metrics_parsing_sums_series_and_skips_the_rest() -> None:
    text = ('# HELP kvpilot:num_requests_running x\nkvpilot:num_requests_running{a="1"} 3.0\n'
            'kvpilot:num_requests_waiting{a="1"} 2\nkvpilot:num_requests_waiting{a="2"} 1\n'
            'kvpilot:kv_cache_usage_perc{a="1"} 0.5\nkvpilot:prefix_cache_hits_total{a="1"} 64.0\n'
            'kvpilot:time_to_first_token_seconds_bucket{le="0.1"} 9\nkvpilot:num_requests_running{a="1"} bad\n'
            'kvpilot:num_empty_kv_blocks{a="1"} 192.0\n')
    load = parse_engine_metrics(text)
    assert (load.running, load.waiting, load.kv_usage, load.prefix_hits, load.empty_blocks) == (3.0, 3.0, 0.5, 64.0,
                                                                                                 192.0)
    assert parse_engine_metrics("").empty_blocks is None, "an engine that does not report its room"
