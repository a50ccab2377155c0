"""Grammar compilation for the engine core's tokenizer: on background threads, cached by content.

Compiling a schema for a 32k-token vocabulary takes 5-50 ms (bench/results/grammar_libs.json) and grows with
the vocabulary; the step loop never waits for it. A constrained request is held back from the scheduler until
its grammar is ready, and requests with a grammar already compiled (same kind and text, same tokenizer, since
one compiler serves one model) reuse it at once. Compiled grammars cannot cross the pipe from the front
cheaply (serializing one is slower than compiling it), so the core compiles its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kvpilot.engine.structured import grammar
from kvpilot.engine.structured.params import StructuredOutputs

log = logging.getLogger(__name__)

CACHE_BYTES = 512 * 1024**2


class GrammarCompiler:
    def __init__(self, model_dir: Path, vocab_size: int, stop_token_ids: tuple[int, ...],
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.model_dir = model_dir
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.cache_bytes = cache_bytes
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvpilot-grammar")
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cached_bytes = 0
        self._pending: dict[tuple[str, str], Future[Any]] = {}
        self.num_compiles = 0
        self.compile_seconds = 0.0
        self.num_cache_hits = 0

    def submit(self, spec: StructuredOutputs) -> Future[Any]:
        """A future of the compiled grammar: done at once on a cache hit, shared by concurrent asks."""
        key = spec.key
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                done: Future[Any] = Future()
                done.set_result(compiled)
                return done
            pending = self._pending.get(key)
            if pending is not None:
                self.num_cache_hits += 1
                return pending
            future = self._pool.submit(self._compile, key, spec)
            self._pending[key] = future
            return future

    def _tokenizer_compiler(self) -> Any:
        """The xgrammar compiler for this model's tokenizer, built on first use (on a compile thread)."""
        if self._compiler is None:
            import xgrammar as xgr
            from kvpilot.engine.model_info import load_tokenizer

            tokenizer = load_tokenizer(self.model_dir)
            if tokenizer is None:
                raise ValueError("this model has no tokenizer: grammars cannot be compiled for it")
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=list(self.stop_token_ids))
            threads = max(1, min(8, (os.cpu_count() or 2) // 2))
            self._compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        return self._compiler

    def _compile(self, key: tuple[str, str], spec: StructuredOutputs) -> Any:
        try:
            start = time.perf_counter()
            compiled = self._tokenizer_compiler().compile_grammar(grammar.build(spec))
            seconds = time.perf_counter() - start
            with self._lock:
                self.num_compiles += 1
                self.compile_seconds += seconds
                self._cache[key] = compiled
                self._cached_bytes += compiled.memory_size_bytes
                while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cached_bytes -= old.memory_size_bytes
            log.debug("compiled a %s grammar in %.1f ms", spec.kind, seconds * 1000)
            return compiled
        finally:
            with self._lock:
                self._pending.pop(key, None)

    def reset_stats(self) -> None:
        """Forget the counts (the engine's warm-up compiles too); the cache stays."""
        with self._lock:
            self.num_compiles, self.compile_seconds, self.num_cache_hits = 0, 0.0, 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
