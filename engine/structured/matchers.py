"""Each constrained sample's grammar state, and a step's token bitmask.

The engine core accepts every token a constrained sample gains (sampled or forced), so its matcher always
stands at the sample's last known token: preemption keeps a sequence's tokens and recomputes only its KV, so
the matcher stays valid across it. A step's bitmask is filled on the host after the step's forward is queued
(so it overlaps the forward) and uploaded without waiting for the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


class SampleGrammar:
    """One sample's matcher over a compiled grammar."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """A stop token was accepted: the output is complete."""
        return bool(self.matcher.is_terminated())

    def jump_forward(self, limit: int, stop_token_ids: frozenset[int]) -> list[int]:
        """Tokens the grammar forces next (at most `limit`, none of them a stop token), accepted already."""
        if limit <= 0:
            return []
        forced: list[int] = []
        for token in self.matcher.find_jump_forward_tokens()[:limit]:
            if token in stop_token_ids or not self.matcher.accept_token(token):
                break
            forced.append(token)
        return forced


@dataclass
class GrammarMask:
    """A step's bitmask on the device, one row per logits row; only `rows` are constrained."""

    bits: torch.Tensor  # [sampled rows, ceil(vocab / 32)] int32
    rows: list[int]

    def apply(self, logits: torch.Tensor) -> None:
        """Disallowed tokens' logits to -inf, in place, before anything else touches them."""
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, self.bits, indices=self.rows)

    def for_row(self, row: int) -> GrammarMask | None:
        """The mask of one logits row alone (the sampler isolates failing rows one by one)."""
        if row not in self.rows:
            return None
        return GrammarMask(self.bits[row : row + 1], [0])


class BitmaskFiller:
    """Fills the bitmask rows of a step's constrained samples into one pinned host buffer, then uploads it."""

    def __init__(self, vocab_size: int, max_rows: int, device: torch.device) -> None:
        import xgrammar as xgr

        self.device = device
        self.host = xgr.allocate_token_bitmask(max_rows, vocab_size)
        if device.type == "cuda":
            self.host = self.host.pin_memory()
        self.batch = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))

    def fill(self, grammars: list[tuple[int, SampleGrammar]], num_rows: int) -> GrammarMask:
        """`grammars`: (logits row, grammar) of each constrained sample of a step of `num_rows` sampled rows.

        One host buffer is safe: a constrained step is collected (its upload long done) before the next
        constrained step fills the buffer again.
        """
        rows = [row for row, _ in grammars]
        self.batch.batch_fill_next_token_bitmask([g.matcher for _, g in grammars], self.host, indices=rows)
        bits = self.host[:num_rows]
        bits = bits.to(self.device, non_blocking=True) if self.device.type == "cuda" else bits.clone()
        return GrammarMask(bits, rows)
