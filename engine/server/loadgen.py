"""The load generator: Poisson arrivals of streaming completions, latency percentiles and throughput.

`run_benchmark` is an async function returning a pydantic `BenchResult`, so the tuner calls it
in-process; `kvpilot bench serve` is a thin CLI over it. It imports neither torch nor transformers.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from typing import Any

import httpx
import numpy as np
from kvpilot.engine.server.workloads import BenchRequest, Workload
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm


class BenchConfig(BaseModel):
    url: str = Field(description="server base URL, e.g. http://127.0.0.1:8000")
    model: str | None = Field(default=None, description="default: the first model the server lists")
    workload: Workload
    model_config = ConfigDict(ser_json_inf_nan="strings")

    request_rate: float = Field(default=math.inf, gt=0, description="mean arrivals/s (Poisson); inf: all at once")
    max_concurrency: int | None = Field(default=None, ge=1, description="most requests in flight")
    vocab_size: int | None = Field(default=None, ge=2, description="default: the server's /v1/models vocab_size")
    api_key: str | None = Field(default=None, exclude=True, description="never written to results")
    ignore_eos: bool = Field(default=True, description="generate exactly max_tokens (vLLM's extension)")
    temperature: float = 0.0
    timeout_s: float = Field(default=600.0, gt=0)
    slo_ttft_s: float | None = Field(default=None, gt=0, description="for goodput: TTFT target")
    slo_tpot_s: float | None = Field(default=None, gt=0, description="for goodput: TPOT target")
    progress: bool = True
    keep_requests: bool = Field(default=False, description="keep per-request records in the result")


class RequestRecord(BaseModel):
    ok: bool
    status: str = "200"  # HTTP status, or 'stream_error:<code>', 'timeout', 'connect_error'
    error: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    expected_output_tokens: int = 0
    start_s: float = 0.0  # since the benchmark began
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = Field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


class Percentiles(BaseModel):
    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        if not values:
            return cls()
        a = np.asarray(values, dtype=float)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(count=len(a), mean=float(a.mean()), p50=float(p50), p90=float(p90), p99=float(p99),
                   max=float(a.max()))


class BenchResult(BaseModel):
    config: BenchConfig
    model: str
    started_at: float = Field(description="Unix time of the first request: where a metrics window can begin")
    duration_s: float
    num_requests: int
    completed: int
    failed: int
    failures: dict[str, int] = Field(description="failed requests by HTTP status or stream error")
    total_prompt_tokens: int
    total_output_tokens: int
    request_throughput: float = Field(description="completed requests per second")
    output_throughput: float = Field(description="generated tokens per second")
    total_token_throughput: float = Field(description="prompt + generated tokens per second")
    goodput: float | None = Field(default=None, description="completed requests per second within both SLOs")
    ttft_s: Percentiles
    tpot_s: Percentiles
    itl_s: Percentiles
    e2e_s: Percentiles
    requests: list[RequestRecord] | None = None


async def _discover(client: httpx.AsyncClient, config: BenchConfig) -> tuple[str, int | None]:
    response = await client.get("/v1/models")
    response.raise_for_status()
    cards: list[dict[str, Any]] = response.json()["data"]
    card = next((c for c in cards if config.model in (None, c["id"])), None)
    if card is None:
        raise ValueError(f"the server does not serve {config.model!r}: it lists {[c['id'] for c in cards]}")
    return card["id"], card.get("vocab_size")


async def _send(
    client: httpx.AsyncClient, config: BenchConfig, model: str, req: BenchRequest, t0: float
) -> RequestRecord:
    body = {
        "model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": config.temperature,
        "ignore_eos": config.ignore_eos,
    }
    start = time.perf_counter()
    rec = RequestRecord(ok=False, start_s=start - t0, expected_output_tokens=req.max_tokens)
    last: float | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                rec.status = str(response.status_code)
                rec.error = (await response.aread()).decode(errors="replace")[:500]
                return rec
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.status = f"stream_error:{chunk['error'].get('code')}"
                    rec.error = chunk["error"].get("message")
                    return rec
                now = time.perf_counter()
                if chunk.get("choices"):
                    if last is None:
                        rec.ttft_s = now - start
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                if chunk.get("usage"):
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
    except httpx.TimeoutException as exc:
        rec.status, rec.error = "timeout", str(exc)
        return rec
    except httpx.TransportError as exc:
        rec.status, rec.error = "connect_error", f"{type(exc).__name__}: {exc}"
        return rec
    rec.e2e_s = time.perf_counter() - start
    rec.ok = rec.ttft_s is not None
    if not rec.ok:
        rec.status, rec.error = "empty_stream", "the stream ended without any output"
    return rec


def _summarize(
    config: BenchConfig, model: str, records: list[RequestRecord], started_at: float, duration: float
) -> BenchResult:
    ok = [r for r in records if r.ok]
    failures: dict[str, int] = {}
    for r in records:
        if not r.ok:
            failures[r.status] = failures.get(r.status, 0) + 1
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    goodput = None
    if config.slo_ttft_s is not None or config.slo_tpot_s is not None:
        good = [
            r for r in ok
            if (config.slo_ttft_s is None or (r.ttft_s or 0.0) <= config.slo_ttft_s)
            and (config.slo_tpot_s is None or (r.tpot_s or 0.0) <= config.slo_tpot_s)
        ]
        goodput = len(good) / duration
    return BenchResult(
        config=config, model=model, started_at=started_at, duration_s=duration, num_requests=len(records),
        completed=len(ok), failed=len(records) - len(ok), failures=failures, total_prompt_tokens=prompt_tokens,
        total_output_tokens=output_tokens, request_throughput=len(ok) / duration,
        output_throughput=output_tokens / duration, total_token_throughput=(prompt_tokens + output_tokens) / duration,
        goodput=goodput,
        ttft_s=Percentiles.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=Percentiles.of([t for r in ok if (t := r.tpot_s) is not None]),
        itl_s=Percentiles.of([x for r in ok for x in r.itl_s]),
        e2e_s=Percentiles.of([r.e2e_s for r in ok if r.e2e_s is not None]),
        requests=records if config.keep_requests else None,
    )


async def run_benchmark(config: BenchConfig) -> BenchResult:
    """Drive the workload at the server; every request's outcome is counted, failures included."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    timeout = httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 30.0))
    async with httpx.AsyncClient(base_url=config.url, headers=headers, limits=limits, timeout=timeout) as client:
        model, server_vocab = await _discover(client, config)
        vocab = config.vocab_size or server_vocab
        if vocab is None and config.workload.kind != "file":
            raise ValueError("the server reports no vocab_size: pass vocab_size for token-id workloads")
        requests = config.workload.build(vocab or 0)
        gate = asyncio.Semaphore(config.max_concurrency or len(requests))
        rng = random.Random(config.workload.seed)
        bar = tqdm(total=len(requests), disable=not config.progress, desc="requests", unit="req")

        async def one(req: BenchRequest) -> RequestRecord:
            async with gate:
                rec = await _send(client, config, model, req, t0)
            bar.update(1)
            return rec

        started_at, t0 = time.time(), time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            if i and math.isfinite(config.request_rate):
                await asyncio.sleep(rng.expovariate(config.request_rate))
            tasks.append(asyncio.create_task(one(req)))
        records = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
        bar.close()
    return _summarize(config, model, records, started_at, duration)
