"""Real `kvpilot serve` engines and a `kvpilot router` as processes on 127.0.0.1, and a streaming client.

`stream_one` records what a client sees of one streaming completion: status, time to the first event,
events, whether [DONE] came, error events, and which engine the router chose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.router.stub import free_port


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def metric(self, name: str, **labels: str) -> float:
        """A sample of its /metrics: the first series of `name` carrying all of `labels`."""
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.split("{", 1)[0].split(" ", 1)[0] == name and all(w in line for w in wanted):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name}{labels or ''} in {self.url}/metrics")


def _start(args: list[str], log: Path) -> Process:
    port = free_port()
    handle = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "kvpilot", *args, "--port", str(port), "--host", "127.0.0.1"],
                            stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
    handle.close()
    return Process(proc, f"http://127.0.0.1:{port}", log)


def _wait_ready(process: Process, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{process.url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.proc.poll() is None, process.output()
        assert time.monotonic() < deadline, f"{process.url} not ready in {timeout_s} s:\n{process.output()}"
        time.sleep(0.1)


def _stop(processes: list[Process]) -> None:
    for p in processes:
        if p.proc.poll() is None:
            p.proc.kill()
    for p in processes:
        p.proc.wait(30)


@contextmanager
def engines(count: int, workdir: Path, *args: str) -> Iterator[list[Process]]:
    started = [_start(["serve", "--model", "demo", "--device", "cpu", "--uvicorn-log-level", "warning", *args],
                      workdir / f"engine-{i}.log") for i in range(count)]
    try:
        for p in started:
            _wait_ready(p, 180)
        yield started
    finally:
        _stop(started)


@contextmanager
def router(backends: list[Process], workdir: Path, *args: str) -> Iterator[Process]:
    flags = [a for b in backends for a in ("--backend", b.url)]
    started = _start(["router", *flags, *args], workdir / "router.log")
    try:
        _wait_ready(started, 60)
        deadline = time.monotonic() + 30
        while True:  # every engine's feed synced, so routing starts from what the engines hold
            pool = httpx.get(f"{started.url}/router/backends", timeout=5).json()
            if len(pool) == len(backends) and all(b["events_synced"] and b["available"] for b in pool):
                break
            assert time.monotonic() < deadline, f"router pool never synced: {pool}"
            time.sleep(0.1)
        yield started
    finally:
        _stop([started])


@dataclass
class Outcome:
    status: int
    ttft_s: float | None = None
    events: int = 0
    done: bool = False
    errors: list[dict[str, object]] = field(default_factory=list)
    engine: str | None = None
    route: str | None = None  # the router's reason for its choice
    failure: str | None = None  # the client's own transport error

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and not self.errors and self.failure is None


async def stream_one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int) -> Outcome:
    body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0.0}
    start = time.monotonic()
    outcome = Outcome(0)
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            outcome.status, outcome.engine = r.status_code, r.headers.get("x-kvpilot-engine")
            outcome.route = r.headers.get("x-kvpilot-route")
            if r.status_code != 200:
                await r.aread()
                return outcome
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if outcome.ttft_s is None:
                    outcome.ttft_s = time.monotonic() - start
                if line == "data: [DONE]":
                    outcome.done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    outcome.errors.append(chunk["error"])
                else:
                    outcome.events += 1
    except httpx.HTTPError as exc:
        outcome.failure = f"{type(exc).__name__}: {exc}"
    return outcome
