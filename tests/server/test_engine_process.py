"""The engine core runs in a process of its own: its death takes the server out of service and out of the
process (so Kubernetes restarts the pod) without leaving a client hanging, and its state reaches /metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx

from tests.server.conftest import RunningServer, stream_completion
from tests.server.test_drain import serve_process


def _engine_pid(server_pid: int) -> int:
    """The spawned engine core among the server's children (not multiprocessing's resource tracker)."""
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"multiprocessing.spawn" in cmdline and b"resource_tracker" not in cmdline:
                return int(child)
    raise AssertionError("no engine core process among the server's children")


def _gauge(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"kvpilot:{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no kvpilot:{name} in /metrics")


async def test_sigkill_of_the_engine_process_under_load() -> None:
    with serve_process(drain_timeout=30) as (proc, url):
        core_pid = _engine_pid(proc.pid)
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            tasks = [asyncio.create_task(stream_completion(client, 200, [3 + i, 9, 12])) for i in range(6)]
            while _gauge((await client.get("/metrics")).text, "num_requests_running") < len(tasks):
                await asyncio.sleep(0.02)
            os.kill(core_pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)  # no client hangs
            not_ready = False
            for _ in range(100):
                try:
                    not_ready = (await client.get("/ready", timeout=2)).status_code == 503
                except httpx.TransportError:
                    not_ready = True  # already gone
                if not_ready:
                    break
                await asyncio.sleep(0.05)
        assert not_ready
        for r in results:
            assert r["status"] == 200 and r["done"], r
            assert r["errors"] and r["errors"][-1]["code"] == "engine_dead", r
            assert r["tokens"] < 200
        start = time.monotonic()
        code = proc.wait(30)
        assert code != 0 and time.monotonic() - start < 30


async def test_engine_state_and_aborts_cross_the_process_boundary(server: RunningServer) -> None:
    assert server.engine.core is None, "the session server runs its engine core in another process"
    prompt = list(range(3, 60))
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        body = {"model": "demo", "prompt": prompt, "max_tokens": 180, "stream": True, "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break
            metrics = (await client.get("/metrics")).text
            assert _gauge(metrics, "num_requests_running") == 1
            assert _gauge(metrics, "kv_cache_usage_perc") > 0
        # The request ended in the core and its blocks came back. That the disconnect, not the request running
        # out, ended it is what test_admission.py's disconnect tests prove (they fail with abort stubbed out).
        server.wait_idle(timeout_s=5)
        metrics = (await client.get("/metrics")).text
        assert _gauge(metrics, "num_requests_running") == 0
        assert _gauge(metrics, "num_free_kv_blocks") == _gauge(metrics, "num_total_kv_blocks")
        hits_before = _gauge(metrics, "prefix_cache_hits_total") if "prefix_cache_hits_total{" in metrics else 0
        for _ in range(2):
            done = await client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert done.status_code == 200
        metrics = (await client.get("/metrics")).text
        assert _gauge(metrics, "prefix_cache_hits_total") >= hits_before + 48  # three 16-token blocks reused
