"""What the router costs on CPU: its added latency (p50, p99) and the request rate one router process sustains.

Stub engines (tests/router/stub.py: a tiny fake OpenAI server answering at once) each run in a process of
their own; `kvpilot router` runs in another with its defaults; this process is the client (aiohttp, a
fixed number of connections, closed loop). Each phase runs the same requests straight to the stubs (round
robin) and through the router, so the difference is the router: JSON parse, block names of a 256-token
prompt, index match, pick, forward, relay. The router's CPU share during the rate phase says whether it,
not the client or the stubs, was the limit.

    python -m bench.router [--stubs 3] [--latency-requests 2000] [--rate-seconds 10] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from kvpilot.engine.block_hash import chain_hash, prefix_block_hashes
from kvpilot.engine.kv_events import KVEventLog

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import git_commit, utc_now, write_result  # noqa: E402
from tests.router.stub import StubEngine, free_port  # noqa: E402

PROMPT_TOKENS, PREFIX_TOKENS, GROUPS = 256, 192, 16


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    """256-token prompts in 16 groups sharing a 192-token prefix: the router names 15 blocks of each."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 500) for _ in range(PREFIX_TOKENS)] for _ in range(GROUPS)]
    return [rng.choice(prefixes) + [rng.randrange(3, 500) for _ in range(PROMPT_TOKENS - PREFIX_TOKENS)]
            for _ in range(count)]


async def _serve_stub(port: int) -> None:
    stub = StubEngine(port=port, record=False, kv=KVEventLog(), events=5)
    await stub.start()
    await asyncio.Event().wait()


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _wait_ready(session: aiohttp.ClientSession, url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with session.get(f"{url}/ready") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} never became ready")
        await asyncio.sleep(0.1)


async def _one(session: aiohttp.ClientSession, url: str, prompt: list[int], stream: bool) -> float:
    """Seconds to the whole answer (non-streaming) or to the first event (streaming)."""
    body = {"model": "demo", "prompt": prompt, "max_tokens": 5, "stream": stream}
    start = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
        if not stream:
            await r.read()
            return time.perf_counter() - start
        first = None
        async for _ in r.content.iter_any():
            first = first or time.perf_counter() - start
        assert first is not None
        return first


def _percentiles(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1000
    return {"count": len(a), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


async def _latency(session: aiohttp.ClientSession, urls: list[str], prompts: list[list[int]],
                   stream: bool) -> dict[str, float]:
    """One request at a time: latency without queueing anywhere."""
    return _percentiles([await _one(session, urls[i % len(urls)], p, stream) for i, p in enumerate(prompts)])


def _block_hash_cost() -> dict[str, float]:
    """What naming blocks costs (the engine names every full block it computes; the router each prompt's)."""
    tokens = list(range(1000, 3048))
    block = tokens[:16]
    n = 20000
    one = timeit.timeit(lambda: chain_hash(7, block), number=n) / n
    salted = timeit.timeit(lambda: hash((7, tuple(block))), number=n) / n
    prompt = timeit.timeit(lambda: prefix_block_hashes(tokens, 16), number=200) / 200
    return {"us_per_16_token_block": one * 1e6, "us_python_hash_before": salted * 1e6,
            "us_per_2048_token_prompt": prompt * 1e6}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _rate(session: aiohttp.ClientSession, urls: list[str], prompts: list[list[int]], concurrency: int,
                seconds: float, router_pid: int | None) -> dict[str, Any]:
    """`concurrency` clients back to back for `seconds`: completed requests per second, latency under load."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        n = i
        while time.perf_counter() < stop:
            latencies.append(await _one(session, urls[n % len(urls)], prompts[n % len(prompts)], stream=False))
            n += concurrency

    cpu_before = _cpu_seconds(router_pid) if router_pid else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    result: dict[str, Any] = {"requests_per_s": len(latencies) / wall, "wall_s": wall, **_percentiles(latencies)}
    if router_pid:
        cpu = _cpu_seconds(router_pid) - cpu_before
        result["router_cpu_share"] = cpu / wall
        result["router_cpu_ms_per_request"] = 1000 * cpu / max(len(latencies), 1)
        result["router_requests_per_cpu_second"] = len(latencies) / cpu if cpu else None
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ports = [free_port() for _ in range(args.stubs)]
    stubs = [_spawn(["-m", "bench.router", "--stub-port", str(p)]) for p in ports]
    stub_urls = [f"http://127.0.0.1:{p}" for p in ports]
    router_port = free_port()
    router_args = ["-m", "kvpilot", "router", "--host", "127.0.0.1", "--port", str(router_port),
                   *[a for u in stub_urls for a in ("--backend", u)]]
    router = _spawn(router_args)
    router_url = f"http://127.0.0.1:{router_port}"
    connector = aiohttp.TCPConnector(limit=args.concurrency + 8)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            for url in [*stub_urls, router_url]:
                await _wait_ready(session, url)
            await asyncio.sleep(1.0)  # the router's first reads of every stub
            prompts = _prompts(args.latency_requests)
            await _latency(session, [router_url], prompts[:200], stream=False)  # warm up both paths
            await _latency(session, stub_urls, prompts[:200], stream=False)
            load_before = os.getloadavg()
            latency = {}
            for stream in (False, True):
                kind = "first_event" if stream else "whole_answer"
                direct = await _latency(session, stub_urls, prompts, stream)
                routed = await _latency(session, [router_url], prompts, stream)
                latency[kind] = {"direct": direct, "router": routed,
                                 "added_p50_ms": routed["p50_ms"] - direct["p50_ms"],
                                 "added_p99_ms": routed["p99_ms"] - direct["p99_ms"]}
            rate = {"direct": await _rate(session, stub_urls, prompts, args.concurrency, args.rate_seconds, None),
                    "router": await _rate(session, [router_url], prompts, args.concurrency, args.rate_seconds,
                                          router.pid)}
            load_after = os.getloadavg()
    finally:
        for p in [router, *stubs]:
            p.terminate()
        for p in [router, *stubs]:
            p.wait(30)
    return {
        "benchmark": "router",
        **git_commit(),
        "date": utc_now(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(), "aiohttp": aiohttp.__version__,
                    "loadavg_1m_before": load_before[0], "loadavg_1m_after": load_after[0],
                    "note": "2 shared cores: router, stubs and client compete with each other and other work"},
        "settings": {"stubs": args.stubs, "latency_requests": args.latency_requests, "rate_seconds": args.rate_seconds,
                     "concurrency": args.concurrency, "prompt_tokens": PROMPT_TOKENS, "groups": GROUPS,
                     "prefix_tokens": PREFIX_TOKENS, "stream_events": 5, "router": "defaults"},
        "latency": latency,
        "rate": rate,
        "block_hash": _block_hash_cost(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stubs", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=2000)
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output", default="router")
    parser.add_argument("--stub-port", type=int, help=argparse.SUPPRESS)  # the stub engine processes
    args = parser.parse_args()
    if args.stub_port:
        asyncio.run(_serve_stub(args.stub_port))
        return
    result = asyncio.run(run(args))
    for kind, figures in result["latency"].items():
        print(f"{kind}: direct p50 {figures['direct']['p50_ms']:.2f} ms p99 {figures['direct']['p99_ms']:.2f}; "
              f"router p50 {figures['router']['p50_ms']:.2f} p99 {figures['router']['p99_ms']:.2f}; "
              f"added p50 {figures['added_p50_ms']:.2f} ms, p99 {figures['added_p99_ms']:.2f} ms")
    rate = result["rate"]
    direct, routed = rate["direct"], rate["router"]
    print(f"rate at {args.concurrency} connections: direct {direct['requests_per_s']:.0f} req/s, router "
          f"{routed['requests_per_s']:.0f} req/s (router CPU {routed['router_cpu_share']:.0%} of a core, "
          f"{routed['router_cpu_ms_per_request']:.2f} ms per request: {routed['router_requests_per_cpu_second']:.0f} "
          "req/s per core)")
    cost = result["block_hash"]
    print(f"block names: {cost['us_per_16_token_block']:.2f} us per 16-token block (Python's hash(): "
          f"{cost['us_python_hash_before']:.2f} us), {cost['us_per_2048_token_prompt']:.0f} us per 2048-token prompt")
    print("wrote", *write_result(args.output, result))


if __name__ == "__main__":
    main()
