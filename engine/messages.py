"""What crosses between the front (input and output processing, in the server process) and the engine core.

The core speaks tokens only: requests of token ids in, per-step token updates out. Each type converts to
and from a plain tuple for the pipe between processes: pickling 256 updates costs about 55 µs as tuples and
540 µs as dataclasses (measured on the CI machine), and the core pays it every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvpilot.engine.config import SamplingParams
from kvpilot.engine.outputs import TokenLogprob


@dataclass(slots=True)
class EngineRequest:
    """A request whose inputs were already processed: token ids inside the vocabulary, params validated."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float

    def to_wire(self) -> tuple[Any, ...]:
        return (self.request_id, self.prompt_token_ids, self.params, self.arrival_time)

    @classmethod
    def from_wire(cls, t: tuple[Any, ...]) -> EngineRequest:
        return cls(*t)


@dataclass(slots=True)
class SeqUpdate:
    """What one sample gained in a step, and how it ended if it did."""

    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | None = None  # the stop token id that ended it


@dataclass(slots=True)
class CoreOutput:
    """One request's updates from one step, with the timings the core alone knows."""

    request_id: str
    seqs: list[SeqUpdate]
    finished: bool
    first_scheduled_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    error: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # of the prompt tokens this step scored, in order

    def to_wire(self) -> tuple[Any, ...]:
        seqs = [
            (s.index, s.new_token_ids, _lps_to_wire(s.new_logprobs), s.finish_reason, s.stop_reason)
            for s in self.seqs
        ]
        return (self.request_id, seqs, self.finished, self.first_scheduled_time, self.num_cached_tokens,
                self.num_preemptions, self.error, _lps_to_wire(self.prompt_logprobs))

    @classmethod
    def from_wire(cls, t: tuple[Any, ...]) -> CoreOutput:
        seqs = [SeqUpdate(i, ids, _lps_from_wire(lps), fr, sr) for i, ids, lps, fr, sr in t[1]]
        return cls(t[0], seqs, *t[2:7], _lps_from_wire(t[7]))


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_empty_blocks: int = 0  # free and holding no cached prefix: taken without evicting
    prefix_cache_hits: int = 0
    prefix_cache_queries: int = 0
    num_preemptions: int = 0
    grammar_compiles: int = 0
    grammar_compile_seconds: float = 0.0
    grammar_cache_hits: int = 0
    jump_forward_tokens: int = 0

    def to_wire(self) -> tuple[Any, ...]:
        return (self.num_running, self.num_waiting, self.kv_cache_usage, self.num_free_blocks,
                self.num_total_blocks, self.num_empty_blocks, self.prefix_cache_hits, self.prefix_cache_queries,
                self.num_preemptions, self.grammar_compiles, self.grammar_compile_seconds, self.grammar_cache_hits,
                self.jump_forward_tokens)


@dataclass(slots=True)
class CoreOutputs:
    """A step's outputs, the engine's state after it, and when its tokens reached the host."""

    outputs: list[CoreOutput] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)
    timestamp: float = 0.0
    requests_received: int = 0  # "add" messages the core has taken so far: the rest are still in the pipe
    block_events: list[tuple[str, int]] = field(default_factory=list)  # ("stored" | "evicted", name), in order

    def to_wire(self) -> tuple[Any, ...]:
        return ([o.to_wire() for o in self.outputs], self.stats.to_wire(), self.timestamp, self.requests_received,
                self.block_events)

    @classmethod
    def from_wire(cls, t: tuple[Any, ...]) -> CoreOutputs:
        return cls([CoreOutput.from_wire(o) for o in t[0]], EngineStats(*t[1]), t[2], t[3], t[4])


@dataclass(frozen=True, slots=True)
class CoreInfo:
    """What the front learns once the core is up: the pool it sized and the limits it resolved."""

    num_kv_blocks: int
    block_size: int
    max_model_len: int
    max_blocks_per_seq: int | None = None  # under a sliding window in every layer; None: a whole context's


def _lps_to_wire(lps: list[TokenLogprob] | None) -> list[tuple[int, float, dict[int, float]]] | None:
    return None if lps is None else [(lp.token_id, lp.logprob, lp.top) for lp in lps]


def _lps_from_wire(lps: list[tuple[int, float, dict[int, float]]] | None) -> list[TokenLogprob] | None:
    return None if lps is None else [TokenLogprob(*lp) for lp in lps]
