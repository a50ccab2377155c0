"""The load generator against a scripted SSE server, and its workloads: no engine involved."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from kvpilot.engine.server.loadgen import BenchConfig, BenchResult, Percentiles, run_benchmark
from kvpilot.engine.server.workloads import FileWorkload, RandomWorkload, SharedPrefixWorkload

from tests.server.conftest import free_port

TOKEN_GAP_S = 0.01


def scripted_app() -> FastAPI:
    """Streams max_tokens chunks TOKEN_GAP_S apart; every 5th request is refused, the 7th errors mid-stream."""
    app = FastAPI()
    seen: list[dict[str, object]] = []
    app.state.seen = seen

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"object": "list", "data": [{"id": "fake", "vocab_size": 100}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> object:
        body = await request.json()
        seen.append(body)
        number = len(seen)
        if number % 5 == 0:
            return JSONResponse({"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                                           "code": "overloaded"}}, 429, headers={"Retry-After": "1"})

        async def events() -> AsyncIterator[str]:
            for i in range(body["max_tokens"]):
                await asyncio.sleep(TOKEN_GAP_S)
                if number == 7 and i == 1:
                    error = {"message": "drain", "type": "x", "param": None, "code": "drain_timeout"}
                    yield "data: " + json.dumps({"error": error}) + "\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": "t"}]}) + "\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, FastAPI]]:
    app = scripted_app()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(10)


async def test_metrics_and_failures(fake_server: tuple[str, FastAPI]) -> None:
    url, app = fake_server
    app.state.seen.clear()
    workload = RandomWorkload(num_prompts=20, min_input_len=3, max_input_len=9, min_output_len=5,
                              max_output_len=5, seed=1)
    result = await run_benchmark(BenchConfig(url=url, workload=workload, request_rate=200, max_concurrency=4,
                                             progress=False, keep_requests=True, slo_ttft_s=5.0))
    assert result.model == "fake" and result.num_requests == 20
    assert result.failures == {"429": 4, "stream_error:drain_timeout": 1}
    assert result.completed == 15 and result.total_output_tokens == 15 * 5
    assert result.total_prompt_tokens == sum(len(b["prompt"]) for i, b in enumerate(app.state.seen, 1)
                                             if i % 5 and i != 7)
    assert result.ttft_s.p50 is not None and result.ttft_s.p50 >= TOKEN_GAP_S
    assert result.itl_s.count == 15 * 4 and result.itl_s.p50 >= TOKEN_GAP_S * 0.8
    assert result.tpot_s.p90 is not None and result.e2e_s.p99 >= result.ttft_s.p99
    assert result.goodput == pytest.approx(15 / result.duration_s)
    assert all(b["stream"] and b["ignore_eos"] and all(0 <= t < 100 for t in b["prompt"]) for b in app.state.seen)
    round_trip = BenchResult.model_validate_json(result.model_dump_json())
    assert round_trip.config.workload == workload and round_trip.requests is not None


async def test_concurrency_bound_and_rate(fake_server: tuple[str, FastAPI]) -> None:
    url, _ = fake_server
    workload = RandomWorkload(num_prompts=8, min_input_len=2, max_input_len=2, min_output_len=10, max_output_len=10)
    start = time.perf_counter()
    result = await run_benchmark(BenchConfig(url=url, workload=workload, max_concurrency=1, progress=False,
                                             keep_requests=True))
    records = sorted(result.requests or [], key=lambda r: r.start_s)
    # One at a time: each request starts after the previous one ended.
    assert all(b.start_s >= a.start_s + (a.e2e_s or 0.0) - 0.005 for a, b in itertools.pairwise(records))
    assert time.perf_counter() - start >= 8 * 10 * TOKEN_GAP_S * 0.8 * 0.75


def test_workloads_are_exact_and_reproducible(tmp_path: Path) -> None:
    random_wl = RandomWorkload(num_prompts=50, min_input_len=4, max_input_len=12, min_output_len=1,
                               max_output_len=3, seed=9)
    built = random_wl.build(vocab_size=50)
    assert built == random_wl.build(vocab_size=50)
    assert all(4 <= len(r.prompt) <= 12 and 1 <= r.max_tokens <= 3 for r in built)
    shared = SharedPrefixWorkload(num_groups=3, prompts_per_group=4, prefix_len=10, suffix_len=2, output_len=7)
    reqs = shared.build(vocab_size=1000)
    assert shared.num_prompts == 12 and len(reqs) == 12
    assert len({tuple(r.prompt[:10]) for r in reqs}) == 3 and all(len(r.prompt) == 12 for r in reqs)
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello"}\n\n{"prompt": [1, 2], "max_tokens": 3}\n')
    reqs = FileWorkload(path=path, num_prompts=3, output_len=5).build(0)
    assert [(r.prompt, r.max_tokens) for r in reqs] == [("hello", 5), ([1, 2], 3), ("hello", 5)]
    path.write_text('{"text": 1}\n')
    with pytest.raises(ValueError, match=r"prompts\.jsonl:1"):
        FileWorkload(path=path).build(0)
    with pytest.raises(ValueError):
        RandomWorkload(min_input_len=5, max_input_len=4)


def test_percentiles() -> None:
    p = Percentiles.of([float(x) for x in range(1, 101)])
    assert p.count == 100 and p.p50 == pytest.approx(50.5) and p.p99 == pytest.approx(99.01) and p.max == 100
    assert Percentiles.of([]).p50 is None


def test_bench_cli_writes_result(fake_server: tuple[str, FastAPI], tmp_path: Path) -> None:
    url, _ = fake_server
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kvpilot", "bench", "serve", "--url", url, "--workload", "shared-prefix",
         "--num-groups", "2", "--prompts-per-group", "2", "--prefix-len", "4", "--suffix-len", "1",
         "--output-len", "2", "2", "--request-rate", "inf", "--seed", "5", "--output", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["config"]["workload"] == {"kind": "shared-prefix", "num_prompts": 4, "seed": 5, "num_groups": 2,
                                            "prompts_per_group": 2, "prefix_len": 4, "suffix_len": 1,
                                            "output_len": 2}
    assert result["config"]["request_rate"] == "Infinity" and math.isinf(float(result["config"]["request_rate"]))
    assert result["num_requests"] == 4 and "ttft_s" in result and "api_key" not in result["config"]
