"""GET /kv/events on a real engine: the blocks a request fills appear as stored under the router's names,
pool pressure evicts them, a late or restarted reader resyncs from a snapshot, and a waiting reader
hears a store at once."""

from __future__ import annotations

import asyncio
import time

import httpx
from kvpilot.engine.block_hash import HASH_SCHEME, prefix_block_hashes

from tests.server.conftest import serve


def _complete(url: str, prompt: list[int]) -> None:
    body = {"model": "demo", "prompt": prompt, "max_tokens": 2, "ignore_eos": True}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200


def test_store_evict_and_resync_through_http() -> None:
    with serve(num_kv_blocks=12, max_model_len=128) as server:
        snapshot = httpx.get(f"{server.url}/kv/events").json()
        assert snapshot["reset"] and snapshot["blocks"] == [] and snapshot["prefix_caching"]
        assert snapshot["block_size"] == 16 and snapshot["hash_scheme"] == HASH_SCHEME
        epoch, seq = snapshot["epoch"], snapshot["seq"]

        prompt = list(range(3, 3 + 80))  # five full blocks
        _complete(server.url, prompt)
        batch = httpx.get(f"{server.url}/kv/events", params={"epoch": epoch, "seq": seq}).json()
        stored = [h for kind, h in batch["events"] if kind == "stored"]
        assert not batch["reset"] and stored[:5] == prefix_block_hashes(prompt, 16)

        _complete(server.url, list(range(200, 200 + 120)))  # needs more blocks than are free: evicts
        later = httpx.get(f"{server.url}/kv/events", params={"epoch": epoch, "seq": batch["seq"]}).json()
        evicted = {h for kind, h in later["events"] if kind == "evicted"}
        assert evicted & set(stored), "pool pressure evicted blocks of the first prompt"

        held = set(httpx.get(f"{server.url}/kv/events", params={"epoch": "restarted"}).json()["blocks"])
        replayed = set()
        for kind, h in batch["events"] + later["events"]:
            (replayed.add if kind == "stored" else replayed.discard)(h)
        assert held == replayed, "a resync gives exactly what replaying every event gives"


def test_bad_query_is_a_400_in_the_openai_shape(server) -> None:
    r = httpx.get(f"{server.url}/kv/events", params={"seq": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "query.seq"


async def test_long_poll_returns_as_soon_as_a_block_is_stored(server) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        first = (await client.get("/kv/events")).json()
        params = {"epoch": first["epoch"], "seq": first["seq"], "wait_s": 30}
        started = time.monotonic()
        poll = asyncio.create_task(client.get("/kv/events", params=params))
        await asyncio.sleep(0.2)
        assert not poll.done(), "nothing new yet: the poll waits"
        body = {"model": "demo", "prompt": list(range(400, 440)), "max_tokens": 1}
        assert (await client.post("/v1/completions", json=body)).status_code == 200
        answer = (await poll).json()
        assert time.monotonic() - started < 20 and answer["events"]
