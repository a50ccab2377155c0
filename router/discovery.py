"""Where the router learns its engines: a source publishes the whole current set each time it changes.

The pool swaps to each published set at once (pool.py). `StaticSource` is a fixed list (tests,
benchmarks, a fleet outside Kubernetes); kube_source.py watches a cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

from kvpilot.router.backends import Backend

Publish = Callable[[frozenset[Backend]], None]


class BackendSource(Protocol):
    async def run(self, publish: Publish) -> None:
        """Publish the current set, then every change, until cancelled."""


def static_backend(url: str) -> Backend:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"engine URL {url!r} must look like http://host:port")
    return Backend(name=parts.netloc, url=url.rstrip("/"))


class StaticSource:
    def __init__(self, urls: list[str]) -> None:
        self.backends = frozenset(static_backend(u) for u in urls)

    async def run(self, publish: Publish) -> None:
        publish(self.backends)
        await asyncio.Event().wait()
