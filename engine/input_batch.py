"""A step's host-side inputs, built from the scheduler's decisions: flat token ids, positions, KV slots,
lengths and block tables, plus which rows are sampled and which give prompt logprobs.

Prompt logprobs come from the prefill that runs anyway: a row at position p predicts prompt token p + 1.

A decode row whose input token is still on the GPU (sampled by the step in flight, under async scheduling)
gets a 0 here and an entry in `subs`: the runner copies the real id from the previous step's samples on the
device, so the host never waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from kvpilot.engine.request import PLACEHOLDER, Sequence


@dataclass
class StepInputs:
    """All any tensor-parallel rank needs to run the same forward."""

    ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64
    query_lens: list[int]
    seq_lens: list[int]
    tables: list[list[int]]
    sample_rows: list[int]
    subs_dst: list[int]  # token rows whose id comes from the previous step's samples ...
    subs_src: list[int]  # ... at these rows of it
    prompt_rows: list[int] = field(default_factory=list)  # token rows whose logits score ...
    prompt_targets: list[int] = field(default_factory=list)  # ... these next prompt tokens
    prompt_top_k: int = 0  # most alternatives any of them asks for


@dataclass
class StepRows:
    """Who the step's outputs belong to."""

    sampled: list[Sequence]  # in sample-row order
    prompt: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, first prompt position, count)
    ended: list[Sequence] = field(default_factory=list)  # prompt-only sequences whose prompt this step completes


def build_step_inputs(
    scheduled: list[tuple[Sequence, int]], block_size: int, prev_rows: dict[int, int]
) -> tuple[StepInputs, StepRows]:
    """`prev_rows` maps a sequence id to its row in the samples of the step still in flight."""
    bs = block_size
    # Decodes first: attention then takes them as one block (GQA-packed split-K kernel), the chunks after them.
    scheduled = sorted(scheduled, key=lambda item: item[1] != 1)
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens, seq_lens, tables, sample_rows, sampled = [], [], [], [], []
    subs_dst: list[int] = []
    subs_src: list[int] = []
    rows = StepRows(sampled)
    prompt_rows: list[int] = []
    prompt_targets: list[int] = []
    top_k = 0
    for seq, n in scheduled:
        start = seq.num_computed_tokens
        table = seq.block_table
        base = len(ids)
        if n == 1:  # decode: plain integer arithmetic beats array set-up for one token
            token = seq.token_ids[start]
            if token == PLACEHOLDER:
                subs_dst.append(len(ids))
                subs_src.append(prev_rows[seq.seq_id])
                token = 0
            ids.append(token)
            positions.append(start)
            slots.append(table[start // bs] * bs + start % bs)
        else:
            chunk = seq.token_ids[start : start + n]
            if PLACEHOLDER in chunk:
                raise RuntimeError("a multi-token slice holds a token still on the GPU: a scheduling invariant broke")
            ids.extend(chunk)
            pos = np.arange(start, start + n)
            positions.extend(pos.tolist())
            slots.extend((np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist())
        query_lens.append(n)
        seq_lens.append(start + n)
        tables.append(table)
        if seq.wants_prompt_logprobs:
            # Targets t in [first, last]: the row at position t - 1 predicts prompt token t.
            first, last = max(seq.prompt_logprobs_next, start + 1), min(start + n, seq.num_prompt_tokens - 1)
            if first <= last:
                prompt_rows.extend(range(base + first - 1 - start, base + last - start))
                prompt_targets.extend(seq.token_ids[first : last + 1])
                rows.prompt.append((seq, first, last - first + 1))
                top_k = max(top_k, seq.params.prompt_logprobs or 0)
        if start + n == seq.num_tokens:
            if seq.params.max_tokens == 0:
                rows.ended.append(seq)
            else:
                sample_rows.append(len(ids) - 1)
                sampled.append(seq)
    inputs = StepInputs(
        np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64), np.asarray(slots, dtype=np.int64),
        query_lens, seq_lens, tables, sample_rows, subs_dst, subs_src, prompt_rows, prompt_targets, top_k,
    )
    return inputs, rows


def block_table_array(tables: list[list[int]], out: np.ndarray | None = None) -> np.ndarray:
    """[B, widest] int32, zero-padded; written into `out` (a flat buffer) when given."""
    width = max(max((len(t) for t in tables), default=0), 1)
    if out is None:
        table = np.zeros((len(tables), width), dtype=np.int32)
    else:
        table = out[: len(tables) * width].reshape(len(tables), width)
        table.fill(0)
    for row, t in enumerate(tables):
        table[row, : len(t)] = t
    return table
