"""Admission control at the server's edge: a bounded waiting queue, enforced without a race.

The engine checks its queue bound before it takes its step lock, so a burst that arrives during a
step all passes the check and queues behind the lock. Here the check and the count of submissions
still on their way into the engine happen in one synchronous stretch of the event loop, so at most
`bound` requests ever wait.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from kvpilot.engine.errors import EngineOverloaded


class AdmissionGate:
    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.submitting = 0  # admitted here, not yet counted in the engine's waiting queue

    @contextmanager
    def admit(self, num_waiting: int) -> Iterator[None]:
        if num_waiting + self.submitting >= self.bound:
            raise EngineOverloaded(f"the waiting queue is full ({self.bound} requests): retry later")
        self.submitting += 1
        try:
            yield
        finally:
            self.submitting -= 1
