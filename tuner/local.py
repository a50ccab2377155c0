"""`kvpilot tune` on one machine: each trial starts the engine, drives load steps, reads the metrics, stops it.

Trials run one at a time on one engine port, so a single Prometheus scrape target covers the whole
study; each trial's series carry its own `revision` label (`trial-N`), which the PromQL selects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from kvpilot.engine.server.loadgen import BenchConfig, run_benchmark
from kvpilot.engine.server.workloads import RandomWorkload, SharedPrefixWorkload
from kvpilot.tuner.launcher import Launcher, ServerProcess
from kvpilot.tuner.metrics import EndpointReader, PrometheusReader, Reader
from kvpilot.tuner.objective import (
    SLO,
    Measurement,
    RateSearch,
    RateSearchSettings,
    TrialOutcome,
    confirmed_outcome,
    outcome,
)
from kvpilot.tuner.space import engine_flags
from kvpilot.tuner.study import Params, TrialRecord, TunerStudy
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

SERVED_NAME = "tuned"


class LocalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    slo: SLO
    workload: RandomWorkload | SharedPrefixWorkload = Field(description="num_prompts is set per step from the rate")
    rate: RateSearchSettings = Field(default_factory=RateSearchSettings)
    step_seconds: float = Field(default=2.0, gt=0, description="arrivals last about this long per step")
    confirm_seconds: float = Field(default=4.0, gt=0, description="the longer step that confirms the best rate")
    min_prompts: int = Field(default=8, ge=1)
    warmup_s: float = Field(default=0.5, ge=0, description="start of each step left out of the metrics")
    engine_host: str = "127.0.0.1"
    engine_port: int = Field(ge=1, le=65535)
    serve_args: list[str] = Field(default_factory=list, description="fixed `kvpilot serve` flags for every trial")
    ready_timeout_s: float = Field(default=120.0, gt=0)
    launcher: Launcher = "forkserver"
    gpus: int = Field(default=1, ge=1, description="goodput is divided by this")
    vocab_size: int | None = Field(default=None, ge=2, description="token ids of random prompts lie below; default: "
                                   "the server's (a model served with dummy weights and no tokenizer reports none)")
    workdir: Path

    def measured_with(self) -> dict[str, Any]:
        """What a re-measurement must repeat: the workload, the load steps, the fixed server flags."""
        return self.model_dump(mode="json", include={"workload", "rate", "step_seconds", "confirm_seconds",
                                                     "min_prompts", "warmup_s", "serve_args", "launcher"})

    @property
    def url(self) -> str:
        return f"http://{self.engine_host}:{self.engine_port}"


def _refused(m: Measurement) -> bool:
    """Requests refused as never servable (400: e.g. longer than the whole KV pool), not merely overload (429)."""
    return any(status in ("400", "413") for status in m.failures)


class LocalRunner:
    """Runs the trials the study proposes; `reader_for(revision)` picks Prometheus or the /metrics fallback."""

    def __init__(self, settings: LocalSettings, study: TunerStudy, prometheus_url: str | None,
                 scrape_interval_s: float = 0.5) -> None:
        self.s = settings
        self.study = study
        self.prometheus_url = prometheus_url
        self.scrape_interval_s = scrape_interval_s
        best = study.best()  # a resumed study starts its rate searches where the best trial left off
        self.best_rate: float | None = best.outcome.request_rate if best else None

    def reader_for(self, revision: str) -> Reader:
        labels = {"model_name": SERVED_NAME, "revision": revision}
        if self.prometheus_url:
            return PrometheusReader(self.prometheus_url, labels, self.scrape_interval_s)
        return EndpointReader(f"{self.s.url}/metrics", labels)

    async def _step(self, reader: Reader, rate: float, seed: int, seconds: float | None = None) -> Measurement:
        seconds = seconds or self.s.step_seconds
        n = max(self.s.min_prompts, round(rate * seconds))
        workload = self.s.workload.model_copy(update={"seed": seed, "num_prompts": n})
        if isinstance(workload, SharedPrefixWorkload):
            workload = workload.model_copy(update={"prompts_per_group": max(1, n // workload.num_groups)})
        config = BenchConfig(url=self.s.url, model=SERVED_NAME, workload=workload, request_rate=rate,
                             vocab_size=self.s.vocab_size, progress=False, timeout_s=60.0)
        load = asyncio.create_task(run_benchmark(config))
        await asyncio.sleep(min(self.s.warmup_s, seconds / 2))
        start = await asyncio.to_thread(reader.mark)
        # a configuration that thrashes would hold the step for minutes: past this, its requests are cancelled
        # (the server aborts them) and the step counts as failed; the metrics window still says how slow it was
        deadline = seconds + max(5.0, 2 * seconds)
        try:
            result = await asyncio.wait_for(load, deadline)
            ok, failed, failures = result.completed, result.failed, result.failures
        except TimeoutError:
            ok, failed, failures = 0, n, {"step_timeout": n}
        end = await asyncio.to_thread(reader.mark)
        w = await asyncio.to_thread(reader.window, start, end)
        return Measurement(request_rate=rate, output_tokens_per_s=w.output_tokens_per_s, ttft_p95_s=w.ttft_p95_s,
                           itl_p95_s=w.itl_p95_s, requests_ok=ok, requests_failed=failed, failures=failures,
                           source=w.source)

    async def _measure(self, server: ServerProcess, revision: str) -> TrialOutcome:
        search = RateSearch(self.s.slo, self.s.rate.model_copy(
            update={"start_rate": self.best_rate or self.s.rate.start_rate}))
        reader = self.reader_for(revision)
        await asyncio.to_thread(reader.wait_for_series)
        seed = 0
        while (rate := search.next_rate()) is not None:
            try:
                m = await self._step(reader, rate, seed)
            except httpx.HTTPError as exc:  # the server went away between steps, or stopped answering /v1/models
                code = server.exit_code()
                why = f"the load step failed ({type(exc).__name__}: {exc}); server exit code {code}"
                return TrialOutcome(status="infeasible", steps=search.steps, reason=f"{why}\n{server.log_tail()}")
            seed += 1
            search.record(m)
            log.info("  rate %.2f req/s: %.0f tok/s, TTFT p95 %s, ITL p95 %s, %d failed", rate,
                     m.output_tokens_per_s, _ms(m.ttft_p95_s), _ms(m.itl_p95_s), m.requests_failed)
            code = server.exit_code()
            if code is not None:
                return TrialOutcome(status="infeasible", steps=search.steps,
                                    reason=f"the server died under load (exit {code}):\n{server.log_tail()}")
            if _refused(m):
                why = f"the server refuses requests of the workload as never servable: {m.failures}"
                return TrialOutcome(status="infeasible", steps=search.steps, reason=why)
        best = search.best
        if best is None:
            return outcome(search, self.s.gpus)
        confirm = await self._step(reader, best.request_rate, seed, self.s.confirm_seconds)
        log.info("  confirm %.2f req/s: %.0f tok/s, TTFT p95 %s, ITL p95 %s, %d failed", best.request_rate,
                 confirm.output_tokens_per_s, _ms(confirm.ttft_p95_s), _ms(confirm.itl_p95_s), confirm.requests_failed)
        return confirmed_outcome(search, confirm, self.s.gpus)

    def run_trial(self, params: Params, number: int) -> TrialOutcome:
        revision = f"trial-{number}"
        args = ["--model", self.s.model, "--host", self.s.engine_host, "--port", str(self.s.engine_port),
                "--served-model-name", SERVED_NAME, "--revision", revision, *self.s.serve_args, *engine_flags(params)]
        server = ServerProcess(args, self.s.workdir / f"{revision}.log", self.s.launcher)
        try:
            why = server.wait_ready(self.s.url, self.s.ready_timeout_s)
            if why is not None:
                return TrialOutcome(status="infeasible", reason=why)
            result = asyncio.run(self._measure(server, revision))
        finally:
            server.stop()
        if result.status == "ok" and (self.best_rate is None or result.goodput_per_gpu > self._best_goodput()):
            self.best_rate = result.request_rate
        return result

    def verify(self, record: TrialRecord, seed: int = 1000) -> Measurement:
        """Measure a finished trial's configuration again: a fresh server, its credited rate, a confirm-long step."""
        rate = record.outcome.request_rate
        if record.outcome.status != "ok" or rate is None:
            raise ValueError(f"trial {record.number} has no measured rate to verify ({record.outcome.status})")
        revision = f"verify-{record.number}"
        args = ["--model", self.s.model, "--host", self.s.engine_host, "--port", str(self.s.engine_port),
                "--served-model-name", SERVED_NAME, "--revision", revision, *self.s.serve_args,
                *engine_flags(record.params)]
        server = ServerProcess(args, self.s.workdir / f"{revision}.log", self.s.launcher)
        try:
            why = server.wait_ready(self.s.url, self.s.ready_timeout_s)
            if why is not None:
                raise RuntimeError(why)
            reader = self.reader_for(revision)
            reader.wait_for_series()
            return asyncio.run(self._step(reader, rate, seed, self.s.confirm_seconds))
        finally:
            server.stop()

    def _best_goodput(self) -> float:
        best = self.study.best()
        return best.outcome.goodput_per_gpu if best else 0.0

    def run(self, trials: int, on_trial: Callable[[TrialRecord], None]) -> None:
        """Run until `trials` configurations have been measured (skipped suggestions do not count)."""
        while self.study.trials_run < trials:
            proposal = self.study.ask()
            if proposal is None:
                log.warning("the sampler offers only configurations already known; stopping early")
                return
            t0 = time.monotonic()
            result = self.run_trial(proposal.params, proposal.trial.number)
            on_trial(self.study.tell(proposal, result, time.monotonic() - t0))


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"
