"""A request and its sequences (one per sample), as the engine core moves them forward, in token ids only.

Under async scheduling a sequence's last token(s) can still be on the GPU: `token_ids` then ends with
`num_pending` PLACEHOLDER entries, filled in when the step that sampled them is collected.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from kvpilot.engine.config import SamplingParams
from kvpilot.engine.outputs import RequestMetrics

if TYPE_CHECKING:
    from kvpilot.engine.structured.matchers import SampleGrammar

_seq_ids = itertools.count()
PLACEHOLDER = -1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of a request. Its KV holds the first `num_computed_tokens` of `token_ids`.

    Prefill and decode are the same operation here: each step computes the next slice of
    tokens not yet in the cache, and a token is sampled when the slice reaches the end.
    """

    request: Request
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_released_blocks: int = 0  # leading blocks given back behind the sliding window (placeholders in the table)
    num_pending: int = 0  # trailing tokens sampled on the GPU, not yet read back
    finish_reason: str | None = None
    stop_reason: int | None = None
    grammar: SampleGrammar | None = None  # a constrained sample's matcher, at its last known token
    prompt_logprobs_next: int = 1  # the next prompt position whose logprob is still to compute

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        """Sampled so far, the ones still on the GPU included."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_pending

    def fill_pending(self, token: int) -> None:
        """The oldest placeholder's value arrived from the GPU."""
        self.token_ids[len(self.token_ids) - self.num_pending] = token
        self.num_pending -= 1

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether this sample still owes prompt logprobs (the first sample computes them for the request)."""
        return (self.index == 0 and self.params.prompt_logprobs is not None
                and self.prompt_logprobs_next < self.num_prompt_tokens)

    @property
    def parent(self) -> Sequence | None:
        """Samples after the first wait for the first one's prompt and share its KV blocks."""
        return self.request.seqs[0] if self.index > 0 else None

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    error: str | None = None  # why processing it failed, if it did

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
