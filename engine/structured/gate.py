"""Constrained requests wait here while their grammar compiles; the scheduler sees them only once it is ready.

So a slow compile delays its own request alone: the step loop goes on serving the others.
"""

from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures import Future
from typing import Any

from kvpilot.engine.request import Request
from kvpilot.engine.structured.compiler import GrammarCompiler
from kvpilot.engine.structured.matchers import SampleGrammar


class GrammarGate:
    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._held: dict[str, tuple[Request, Future[Any]]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, request: Request) -> None:
        spec = request.params.structured_outputs
        assert spec is not None
        self._held[request.request_id] = (request, self.compiler.submit(spec))

    def drop(self, request_id: str) -> None:
        self._held.pop(request_id, None)

    def release(self) -> tuple[list[Request], list[tuple[Request, BaseException]]]:
        """Requests whose grammar is ready (each sample given its own matcher), and those whose compile failed."""
        ready: list[Request] = []
        failed: list[tuple[Request, BaseException]] = []
        for request_id, (request, future) in list(self._held.items()):
            if not future.done():
                continue
            del self._held[request_id]
            exc = future.exception()
            if exc is not None:
                failed.append((request, exc))
                continue
            compiled = future.result()
            for seq in request.seqs:
                seq.grammar = SampleGrammar(compiled)
            ready.append(request)
        return ready, failed

    def wait(self, timeout_s: float) -> None:
        """Block until a held grammar is ready or `timeout_s` passes (when there is nothing else to do)."""
        if self._held:
            cf.wait([f for _, f in self._held.values()], timeout=timeout_s, return_when=cf.FIRST_COMPLETED)
