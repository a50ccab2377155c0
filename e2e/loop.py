"""What the node's two controllers share: a reconcile loop as a task, and the processes it runs."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

SHUTDOWN_GRACE_S = 2.0


class ControllerLoop:
    """`start()` runs `_loop()` on the running event loop; `stop()` cancels it and ends every process it
    started, each with at most SHUTDOWN_GRACE_S of grace: the harness is going away, nothing drains."""

    name = "controller"

    def __init__(self) -> None:
        self.runners: dict[str, Any] = {}  # pod -> its runner (terminate(), grace_s)
        self._terminations: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for runner in self.runners.values():
            runner.grace_s = min(runner.grace_s, SHUTDOWN_GRACE_S)
        await asyncio.gather(*(r.terminate() for r in self.runners.values()), *self._terminations)

    async def _loop(self) -> None:
        raise NotImplementedError
