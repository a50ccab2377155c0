"""Clients: steady streaming traffic through the stable Service, and bursts for the overload scenario.

A request succeeds only with HTTP 200, a stream ending in `data: [DONE]` and no error event. A request
that outlives `timeout_s` is a hang, the one failure no scenario tolerates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx

from e2e.proxy import POD_HEADER

ENGINE_HEADER = "x-kvpilot-engine"


@dataclasses.dataclass
class Outcome:
    started: float
    ended: float
    status: int | None  # None: no HTTP answer at all
    ok: bool
    hang: bool
    pod: str | None  # the engine pod that answered
    retry_after: str | None
    error: str
    events: int = 0  # data events received before the end: 0 means it failed before it started streaming
    first_event: float | None = None  # monotonic time of the first data event: TTFT is first_event - started

    @property
    def cut_mid_stream(self) -> bool:
        """Failed after it had started streaming, and was told so with an error event."""
        return not self.ok and self.events > 0 and self.error.startswith("data: ")


async def stream_completion(
    http: httpx.AsyncClient, url: str, model: str, max_tokens: int, timeout_s: float, prompt: str = "Hello there"
) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    started = time.monotonic()
    status: int | None = None
    pod: str | None = None
    retry_after: str | None = None
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                # The engine that served it: the router names it; without a router, the proxy's pick.
                status, pod = response.status_code, response.headers.get(ENGINE_HEADER) or response.headers.get(
                    POD_HEADER)
                retry_after = response.headers.get("Retry-After")
                if status != 200:
                    text = (await response.aread()).decode(errors="replace")
                    return Outcome(started, time.monotonic(), status, False, False, pod, retry_after, text[:200])
                done, events, first = False, 0, None
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: ") and '"error"' in line and "error" in json.loads(line[6:]):
                        return Outcome(started, time.monotonic(), status, False, False, pod, None, line[:200], events,
                                       first)
                    elif line.startswith("data: "):
                        events += 1
                        first = first or time.monotonic()
                error = "" if done else "stream ended without [DONE]"
                return Outcome(started, time.monotonic(), status, done, False, pod, None, error, events, first)
    except TimeoutError:
        return Outcome(started, time.monotonic(), status, False, True, pod, None, f"no answer in {timeout_s}s")
    except httpx.HTTPError as exc:
        return Outcome(started, time.monotonic(), status, False, False, pod, None, repr(exc)[:200])


class SteadyClient:
    """`concurrency` loops, each sending one streaming request after another, for the whole run."""

    def __init__(self, url: str, model: str, concurrency: int, max_tokens: int, timeout_s: float) -> None:
        self.url, self.model, self.concurrency = url, model, concurrency
        self.max_tokens, self.timeout_s = max_tokens, timeout_s
        self.outcomes: list[Outcome] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker(), name=f"client {i}") for i in range(self.concurrency)]

    async def _worker(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=3)) as http:
            while not self._stopping:
                self.outcomes.append(
                    await stream_completion(http, self.url, self.model, self.max_tokens, self.timeout_s)
                )
                await asyncio.sleep(0.05)

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*self._tasks)
        self._tasks = []

    def resume(self) -> None:
        """Start again after stop() (a scenario that needs the service idle pauses it)."""
        self._stopping = False
        self.start()

    def since(self, mark: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started >= mark]


async def burst(url: str, model: str, n: int, max_tokens: int, timeout_s: float) -> list[Outcome]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=3), limits=limits) as http:
        return list(
            await asyncio.gather(*(stream_completion(http, url, model, max_tokens, timeout_s) for _ in range(n)))
        )


class Load:
    """`workers` loops of streaming requests until stop(), which returns every outcome: load of a given shape for
    as long as a scenario needs it."""

    def __init__(self, url: str, model: str, workers: int, max_tokens: int, timeout_s: float = 60,
                 pause_s: float = 0.0) -> None:
        self.url, self.model, self.workers, self.max_tokens, self.timeout_s = url, model, workers, max_tokens, timeout_s
        self.pause_s = pause_s  # between one worker's requests: a paced, light load
        self.outcomes: list[Outcome] = []
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._worker()) for _ in range(self.workers)]

    async def _worker(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=3)) as http:
            while not self._stopping.is_set():
                self.outcomes.append(await stream_completion(http, self.url, self.model, self.max_tokens,
                                                             self.timeout_s))
                if self.pause_s:
                    await asyncio.sleep(self.pause_s)

    async def stop(self) -> list[Outcome]:
        """Idempotent: a second call returns the same outcomes."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes
