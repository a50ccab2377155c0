"""What quantization costs, teacher-forced: the same tokens through a reference engine and a quantized one.

Each prompt is prefilled, then its continuation (the reference's own greedy output) is fed one decode step per
token, so the quantized engine reads its own cache (e4m3 K/V when it has one) exactly as it does when serving,
through the same runner, graphs and tensor-parallel workers. At every continuation position the two logit rows
are compared: absolute logit error, KL(reference || quantized) and whether the top-1 token agrees.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from kvpilot.engine.input_batch import StepInputs

if TYPE_CHECKING:
    from kvpilot.engine.engine_core import EngineCore
    from kvpilot.engine.llm import LLM


@dataclass(frozen=True)
class Accuracy:
    positions: int
    max_abs_logit_err: float
    mean_abs_logit_err: float
    mean_kl: float
    max_kl: float
    top1_agreement: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AccuracyBounds:
    """What a quantized engine may lose; `violations` names every bound a measurement breaks."""

    max_abs_logit_err: float
    mean_kl: float
    max_kl: float
    min_top1_agreement: float

    def violations(self, got: Accuracy) -> list[str]:
        out = [f"{name} {getattr(got, name):.4g} > {limit:.4g}"
               for name, limit in (("max_abs_logit_err", self.max_abs_logit_err), ("mean_kl", self.mean_kl),
                                   ("max_kl", self.max_kl)) if not getattr(got, name) <= limit]
        if not got.top1_agreement >= self.min_top1_agreement:
            out.append(f"top1_agreement {got.top1_agreement:.4g} < {self.min_top1_agreement:.4g}")
        return out


def prompts(vocab_size: int, count: int = 16, seed: int = 0, lengths: tuple[int, int] = (8, 96)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab_size) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def _step(core: EngineCore, ids: list[int], positions: list[int], query_lens: list[int], seq_lens: list[int],
          tables: list[list[int]]) -> torch.Tensor:
    bs = core.config.block_size
    rows = [row for row, n in enumerate(query_lens) for _ in range(n)]
    slots = [tables[row][p // bs] * bs + p % bs for row, p in zip(rows, positions, strict=True)]
    inputs = StepInputs(
        np.asarray(ids, dtype=np.int64), np.asarray(positions, dtype=np.int64), np.asarray(slots, dtype=np.int64),
        query_lens, seq_lens, tables, [int(i) for i in np.cumsum(query_lens) - 1], [], [])
    if core.workers is not None:
        core.workers.send(inputs)
    logits, _ = core.runner.run(inputs)
    return logits.float().cpu()


def teacher_forced_logits(core: EngineCore, prompts: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
    """[sequences, tokens, vocab]: the logits that predict each continuation token. The core must be idle; it is
    reset afterwards (its cache blocks were written directly)."""
    if core.has_unfinished:
        raise RuntimeError("teacher forcing writes cache blocks directly: the engine must be idle")
    steps = len(continuations[0])
    if any(len(c) != steps for c in continuations) or any(len(p) < 2 for p in prompts):
        raise ValueError("continuations must share one length, and prompts hold at least 2 tokens")
    bs = core.config.block_size
    per_seq = [-(-(len(p) + steps) // bs) for p in prompts]
    if sum(per_seq) > core.runner.num_blocks:
        raise ValueError(f"{sum(per_seq)} blocks needed, the pool has {core.runner.num_blocks}")
    starts = np.cumsum([0, *per_seq])
    tables = [list(range(starts[i], starts[i + 1])) for i in range(len(prompts))]
    try:
        rows = [_step(core, [t for p in prompts for t in p], [i for p in prompts for i in range(len(p))],
                      [len(p) for p in prompts], [len(p) for p in prompts], tables)]
        for j in range(1, steps):
            rows.append(_step(core, [c[j - 1] for c in continuations], [len(p) + j - 1 for p in prompts],
                              [1] * len(prompts), [len(p) + j for p in prompts], tables))
    finally:
        core.reset()
    return torch.stack(rows, dim=1)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> Accuracy:
    """Per-position logit error, KL(reference || candidate) in nats and top-1 agreement, over [..., vocab]."""
    ref, cand = reference.flatten(0, -2).double(), candidate.flatten(0, -2).double()
    ref_lp, cand_lp = ref.log_softmax(-1), cand.log_softmax(-1)
    kl = (ref_lp.exp() * (ref_lp - cand_lp)).sum(-1)
    err = (cand - ref).abs()
    return Accuracy(
        positions=ref.shape[0],
        max_abs_logit_err=err.max().item(),
        mean_abs_logit_err=err.mean().item(),
        mean_kl=kl.mean().item(),
        max_kl=kl.max().item(),
        top1_agreement=(ref.argmax(-1) == cand.argmax(-1)).double().mean().item(),
    )


def reference_logits(reference: LLM, prompt_ids: list[list[int]], tokens: int = 32
                     ) -> tuple[list[list[int]], torch.Tensor]:
    """The reference's greedy continuations of `prompt_ids`, and its teacher-forced logits over them."""
    from kvpilot.engine.config import SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    continuations = [o.outputs[0].token_ids for o in reference.generate(prompt_ids, greedy)]
    return continuations, teacher_forced_logits(reference.core, prompt_ids, continuations)


def measure(reference: LLM, candidate: LLM, prompt_ids: list[list[int]], tokens: int = 32) -> Accuracy:
    """The reference's greedy continuations of `prompt_ids`, teacher-forced through both engines."""
    continuations, logits = reference_logits(reference, prompt_ids, tokens)
    return compare(logits, teacher_forced_logits(candidate.core, prompt_ids, continuations))
