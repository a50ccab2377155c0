"""Which rows a launched step samples, and sampling them so that one request's bad parameters fail that
request alone."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from kvpilot.engine.errors import is_engine_fault
from kvpilot.engine.messages import CoreOutput
from kvpilot.engine.request import Request, Sequence
from kvpilot.engine.sampler import SampledBatch, Sampler
from kvpilot.engine.structured.matchers import GrammarMask

log = logging.getLogger(__name__)


def still_sampled(logits: torch.Tensor, seqs: list[Sequence], scheduled: list[tuple[Sequence, int]]
                  ) -> tuple[torch.Tensor, list[Sequence]]:
    """The rows to sample once the previous step is read back: not the samples that ended in it, nor those its
    grammar jumped forward (their forced tokens follow; the synchronous engine never sampled there)."""
    computes = {seq.seq_id: seq.num_computed_tokens + n for seq, n in scheduled}
    keep = [i for i, seq in enumerate(seqs) if not seq.finished and seq.num_tokens == computes[seq.seq_id]]
    if len(keep) == len(seqs):
        return logits, seqs
    index = torch.tensor(keep, dtype=torch.long).to(logits.device, non_blocking=True)
    return logits.index_select(0, index), [seqs[i] for i in keep]


def sample_isolating(
    sampler: Sampler,
    logits: torch.Tensor,
    seqs: list[Sequence],
    mask: GrammarMask | None,
    fail: Callable[[Request, BaseException], CoreOutput],
    failed: list[CoreOutput],
) -> tuple[SampledBatch | None, list[Sequence]]:
    """Sample the batch at once; if that fails, find the rows at fault one by one and fail only them (their
    outputs go to `failed`). A device fault is raised: it is the engine's, not a request's."""
    if not seqs:
        return None, []
    try:
        return sampler(logits, seqs, mask), seqs
    except Exception as exc:
        if is_engine_fault(exc):
            raise
        log.warning("batched sampling failed (%s): isolating the failing request", exc)
    for i, seq in enumerate(seqs):
        if seq.request.error is not None:
            continue
        try:
            sampler(logits[i : i + 1], [seq], mask.for_row(i) if mask is not None else None)
        except Exception as exc:
            if is_engine_fault(exc):
                raise
            failed.append(fail(seq.request, exc))
    keep = [i for i, seq in enumerate(seqs) if seq.request.error is None]
    if not keep:
        return None, []
    kept = [seqs[i] for i in keep]
    return sampler(logits[keep], kept, None), kept  # masks were applied to `logits` in place already
