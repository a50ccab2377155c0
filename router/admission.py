"""The bounded queue: a request no engine has room for waits here, up to `max_queued` requests and
`queue_timeout_s`, and is then refused with Retry-After: 503 while no engine is up at all (scale from
zero, a switch in progress), 429 while engines are up but full. Waiters are woken by any change that can
give room (an engine joined, answered, or finished a request) and re-pick, so a request never waits
while an engine has room for it."""

from __future__ import annotations

import time

from kvpilot.router.config import RouterConfig
from kvpilot.router.errors import RouterError
from kvpilot.router.keys import RouteKey
from kvpilot.router.metrics import RouterMetrics
from kvpilot.router.pool import BackendPool, Choice

_RECHECK_S = 0.25  # also re-pick this often: a refusal's Retry-After or a refused connection's pause ends


class Admission:
    def __init__(self, pool: BackendPool, config: RouterConfig, metrics: RouterMetrics) -> None:
        self._pool = pool
        self._config = config
        self._metrics = metrics
        self.queued = 0

    async def acquire(self, key: RouteKey, avoid: set[str], deadline: float) -> Choice:
        choice = self._pool.choose(key, avoid)
        if choice is not None:
            return choice
        config = self._config
        if self.queued >= config.max_queued:
            raise RouterError(429, f"no engine has room and {self.queued} requests are already waiting for one: "
                              "retry later", type="rate_limit_error", code="queue_full",
                              retry_after=config.retry_after_s)
        self.queued += 1
        self._metrics.queue_depth.inc()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timed_out()
                await self._pool.wait_change(min(remaining, _RECHECK_S))
                choice = self._pool.choose(key, avoid)
                if choice is not None:
                    return choice
        finally:
            self.queued -= 1
            self._metrics.queue_depth.dec()

    def _timed_out(self) -> RouterError:
        wait, retry = self._config.queue_timeout_s, self._config.retry_after_s
        if not self._pool.any_available():
            return RouterError(503, f"no engine is ready to serve (waited {wait:g} s): retry later",
                               type="service_unavailable", code="no_engine", retry_after=retry)
        return RouterError(429, f"every engine stayed full for {wait:g} s: retry later", type="rate_limit_error",
                           code="overloaded", retry_after=retry)
