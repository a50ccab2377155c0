"""Retry rules, stream relaying and errors, through real HTTP: a client, the router, stub engines."""

from __future__ import annotations

import asyncio
import json

import httpx
from kvpilot.router.discovery import static_backend
from kvpilot.router.keys import RouteKey, rendezvous

from tests.router.conftest import eventually, router, stubs
from tests.router.stub import StubEngine

BODY = {"model": "demo", "prompt": [5] * 40, "max_tokens": 4}


def _served(engines: list[StubEngine]) -> list[int]:
    return [len(e.received) for e in engines]


async def _stream(client: httpx.AsyncClient, url: str, body: dict | None = None) -> tuple[int, list[str]]:
    async with client.stream("POST", f"{url}/v1/completions", json={**(body or BODY), "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, []
        return 200, [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]


async def test_non_streaming_and_streaming_pass_through(client: httpx.AsyncClient) -> None:
    async with stubs(1, events=5) as engines, router(engines) as r:
        answer = await client.post(f"{r.url}/v1/completions", json=BODY)
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == "ok"
        assert answer.headers["x-kvpilot-engine"] == engines[0].name
        status, events = await _stream(client, r.url)
        assert status == 200 and [json.loads(e)["i"] for e in events[:-1]] == list(range(5)) and events[-1] == "[DONE]"
        assert engines[0].received[0]["body"] == BODY, "the body reaches the engine unchanged"
        assert (await client.get(f"{r.url}/v1/models")).json()["data"][0]["id"] == "demo"


async def test_refused_connection_goes_to_another_engine(client: httpx.AsyncClient) -> None:
    async with stubs(2) as engines, router(engines) as r:
        await engines[0].stop()  # its port now refuses connections
        for _ in range(6):
            assert (await client.post(f"{r.url}/v1/completions", json=BODY)).status_code == 200
        assert len(engines[1].received) == 6
        assert r.metric("kvpilot:router_requests_total", code="200") == 6


async def test_429_and_503_are_retried_and_the_refusing_engine_rests(client: httpx.AsyncClient) -> None:
    for status in (429, 503):
        async with stubs(1, behaviour=status) as busy, stubs(1) as fine, router([*busy, *fine]) as r:
            for _ in range(4):
                assert (await client.post(f"{r.url}/v1/completions", json=BODY)).status_code == 200
            assert len(fine[0].received) == 4 and len(busy[0].received) <= 1, "Retry-After keeps it out meanwhile"


async def test_refusal_is_passed_on_when_every_engine_refuses(client: httpx.AsyncClient) -> None:
    async with stubs(2, behaviour=429) as engines, router(engines, queue_timeout_s=0.3) as r:
        answer = await client.post(f"{r.url}/v1/completions", json=BODY)
        assert answer.status_code == 429 and answer.headers["retry-after"]
        assert answer.json()["error"]["type"] in ("stub", "rate_limit_error")
        assert sum(_served(engines)) == 2, "each engine tried once, then the queue held it until its timeout"


async def test_a_refusing_engine_is_tried_again_after_its_retry_after_while_the_request_may_wait(
        client: httpx.AsyncClient) -> None:
    """Scale from zero: the first engine up cannot take every request that waited for it; the ones it refuses wait
    out its Retry-After and get it then, instead of being refused for want of another engine."""
    async with stubs(1, behaviour=429) as (engine,), router([engine], queue_timeout_s=10) as r:
        pending = asyncio.ensure_future(client.post(f"{r.url}/v1/completions", json=BODY))
        await asyncio.sleep(3.5)  # longer than max_attempts (3) refusals 1 s apart: refusals spend no attempt
        assert not pending.done()
        engine.behaviour = "ok"  # room now
        answer = await pending
        assert answer.status_code == 200, answer.text
        assert r.metric("kvpilot:router_retries_total", reason="overloaded") >= 1


async def test_client_errors_and_server_errors_are_not_retried(client: httpx.AsyncClient) -> None:
    for status in (400, 404, 500):
        async with stubs(3, behaviour=status) as engines, router(engines) as r:
            answer = await client.post(f"{r.url}/v1/completions", json=BODY)
            assert answer.status_code == status and answer.json()["error"]["message"] == f"stub says {status}"
            assert sum(_served(engines)) == 1
            assert r.metric("kvpilot:router_retries_total", reason="overloaded") == 0


def _prompts_owned_by(owner: str, names: list[str], count: int) -> list[list[int]]:
    """Prompts that consistent hashing sends to `owner` first."""
    prompts, token = [], 1
    while len(prompts) < count:
        prompt = [token] * 40
        key = RouteKey(token_ids=prompt).hash_key(16, 4, 256)
        assert key is not None
        if max(names, key=lambda n: rendezvous(key, n)) == owner:
            prompts.append(prompt)
        token += 1
    return prompts


async def test_engine_vanishing_before_the_first_byte_is_retried(client: httpx.AsyncClient) -> None:
    for behaviour in ("cut_before", "cut_head"):
        async with stubs(1, behaviour=behaviour) as dying, stubs(1) as fine, router([*dying, *fine]) as r:
            prompts = _prompts_owned_by(dying[0].name, [dying[0].name, fine[0].name], 8)
            for stream_prompt, plain_prompt in zip(prompts[::2], prompts[1::2], strict=True):
                status, events = await _stream(client, r.url, {**BODY, "prompt": stream_prompt})
                assert status == 200 and events[-1] == "[DONE]" and all("error" not in e for e in events)
                answer = await client.post(f"{r.url}/v1/completions", json={**BODY, "prompt": plain_prompt})
                assert answer.status_code == 200
            assert len(dying[0].received) == len(fine[0].received) == 8, "each went to its owner first, then over"
            assert r.metric("kvpilot:router_retries_total", reason="disconnected") == 8


async def test_stream_cut_mid_way_ends_with_an_error_event_and_done(client: httpx.AsyncClient) -> None:
    async with stubs(1, behaviour="cut_after", events=3) as engines, router(engines) as r:
        status, events = await asyncio.wait_for(_stream(client, r.url), 10)
        assert status == 200 and events[-1] == "[DONE]"
        payloads = [json.loads(e) for e in events[:-1]]
        assert [p.get("i") for p in payloads[:3]] == [0, 1, 2], "whole events only: the half event is dropped"
        error = payloads[3]["error"]
        assert error["code"] == "stream_cut" and error["type"] == "upstream_error" and "3 events" in error["message"]
        assert len(payloads) == 4
        assert r.metric("kvpilot:router_upstream_errors_total", kind="stream_cut") == 1


async def test_no_engine_queues_then_503_and_a_full_queue_429s(client: httpx.AsyncClient) -> None:
    async with router([], queue_timeout_s=0.3, max_queued=2) as r:
        answer = await client.post(f"{r.url}/v1/completions", json=BODY)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["code"] == "no_engine"
    async with router([], queue_timeout_s=3.0, max_queued=2) as r:
        waiting = [asyncio.create_task(client.post(f"{r.url}/v1/completions", json=BODY)) for _ in range(2)]
        await eventually(lambda: r.ctx.admission.queued == 2)
        over = await client.post(f"{r.url}/v1/completions", json=BODY)
        assert over.status_code == 429 and over.json()["error"]["code"] == "queue_full" and over.headers["retry-after"]
        assert r.metric("kvpilot:router_requests_received_total") == 3, "demand counts on arrival, refused or not"
        assert [a.status_code for a in await asyncio.gather(*waiting)] == [503, 503]


async def test_queued_requests_are_served_when_the_first_engine_arrives(client: httpx.AsyncClient) -> None:
    """Scale from zero: requests wait in the bounded queue and go out as soon as an engine joins."""
    async with router([], queue_timeout_s=10.0) as r, stubs(1) as engines:
        waiting = [asyncio.create_task(client.post(f"{r.url}/v1/completions", json=BODY)) for _ in range(3)]
        await eventually(lambda: r.ctx.admission.queued == 3)
        assert r.metric("kvpilot:router_queue_depth") == 3
        r.source.publish([static_backend(engines[0].url)])
        assert [a.status_code for a in await asyncio.gather(*waiting)] == [200, 200, 200]
        assert r.metric("kvpilot:router_queue_time_seconds_count") == 3


async def test_swap_is_atomic_and_requests_on_the_old_set_finish(client: httpx.AsyncClient) -> None:
    """Blue-green: new requests go only to the new set from the swap on; a stream on the old one completes."""
    async with stubs(2, events=20, event_delay_s=0.02) as old, stubs(2) as new, router(old) as r:
        long_stream = asyncio.create_task(_stream(client, r.url))
        await eventually(lambda: sum(_served(old)) == 1)
        r.source.publish([static_backend(e.url) for e in new])
        answers = await asyncio.gather(*(client.post(f"{r.url}/v1/completions", json={**BODY, "prompt": [i] * 40})
                                         for i in range(1, 11)))
        assert all(a.status_code == 200 for a in answers)
        assert {a.headers["x-kvpilot-engine"] for a in answers} <= {e.name for e in new}
        status, events = await long_stream
        assert status == 200 and len(events) == 21 and events[-1] == "[DONE]"
        assert sum(_served(old)) == 1


async def test_router_errors_are_openai_shaped(client: httpx.AsyncClient) -> None:
    async with stubs(1) as engines, router(engines, max_body_bytes=1024) as r:
        missing = await client.get(f"{r.url}/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        big = await client.post(f"{r.url}/v1/completions", content=b"x" * 4096,
                                headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and "error" in big.json()
        assert not engines[0].received
        garbage = await client.post(f"{r.url}/v1/completions", content=b"{not json",
                                    headers={"Content-Type": "application/json"})
        assert garbage.status_code == 400 and garbage.json()["error"]["message"] == "stub cannot parse the body", \
            "the engine judges what is valid"


async def test_client_leaving_mid_stream_closes_the_engine_side(client: httpx.AsyncClient) -> None:
    async with stubs(1, events=1000, event_delay_s=0.01) as engines, router(engines) as r:
        async with client.stream("POST", f"{r.url}/v1/completions", json={**BODY, "stream": True}) as answer:
            async for line in answer.aiter_lines():
                if line.startswith("data: "):
                    break
        await eventually(lambda: r.ctx.pool.states[0].in_flight == 0)


async def test_a_silent_engine_gets_504_and_no_retry(client: httpx.AsyncClient) -> None:
    async with stubs(2, behaviour="hang") as engines, router(engines, upstream_timeout_s=0.3) as r:
        for stream in (False, True):
            answer = await client.post(f"{r.url}/v1/completions", json={**BODY, "stream": stream})
            assert answer.status_code == 504 and answer.json()["error"]["code"] == "upstream_timeout"
        assert sum(_served(engines)) == 2, "one engine per request: the work may still be running there"
        assert r.metric("kvpilot:router_upstream_errors_total", kind="timeout") == 2
