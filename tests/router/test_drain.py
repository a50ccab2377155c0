"""SIGTERM on a `kvpilot router` process: it stops taking connections, lets a stream in flight finish, exits 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import httpx

from tests.router.conftest import eventually, stubs
from tests.router.stub import free_port


async def _ready(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(f"{url}/ready")).status_code == 200
    except httpx.TransportError:
        return False


async def _refused(client: httpx.AsyncClient, url: str) -> bool:
    """No new connections once draining (the listening socket is closed)."""
    return not await _ready(client, url)


async def test_sigterm_drains_streams_in_flight() -> None:
    async with stubs(1, events=20, event_delay_s=0.1) as engines:
        port = free_port()
        router = subprocess.Popen([sys.executable, "-m", "kvpilot", "router", "--backend", engines[0].url,
                                   "--host", "127.0.0.1", "--port", str(port)], stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(timeout=30) as client:
                await eventually(lambda: _ready(client, url), timeout_s=60)

                async def stream() -> list[str]:
                    body = {"model": "demo", "prompt": [1] * 40, "stream": True}
                    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                        return [line async for line in r.aiter_lines() if line.startswith("data: ")]

                in_flight = asyncio.create_task(stream())
                await eventually(lambda: len(engines[0].received) == 1)
                router.send_signal(signal.SIGTERM)
                await eventually(lambda: _refused(client, url))
                lines = await in_flight
                assert len(lines) == 21 and lines[-1] == "data: [DONE]"
                assert await asyncio.to_thread(router.wait, 30) == 0
        finally:
            if router.poll() is None:
                router.kill()
                router.wait(10)
