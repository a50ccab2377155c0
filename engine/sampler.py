"""From logits to tokens, per request: a grammar's mask, logit_bias, penalties, min_tokens, temperature,
top-k/top-p/min-p, seeds, logprobs.

A grammar's mask comes first, so nothing after it can revive a token the grammar forbids. Logprobs are
reported from the model's distribution before penalties and temperature (under a grammar, the masked one), as
vLLM does. min_tokens does not hold a constrained sample back from ending: its grammar decides where it ends.
A seeded sample draws only from its own generator, one draw per token, so its tokens do not depend
on which other requests share the batch; unseeded rows draw together from the engine's generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from kvpilot.engine.outputs import TokenLogprob
from kvpilot.engine.request import Sequence
from kvpilot.engine.structured.matchers import GrammarMask


@dataclass
class SampledBatch:
    """A step's samples, still on the device: the core reads them back one step later."""

    tokens: torch.Tensor  # [B] int64
    logprob: torch.Tensor | None = None  # [B] the chosen token's raw logprob
    top_ids: torch.Tensor | None = None  # [B, k] the k most likely tokens, k = the largest logprobs asked
    top_logprobs: torch.Tensor | None = None


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], device: torch.device, seed: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], mask: GrammarMask | None = None) -> SampledBatch:
        """Sample one token per row without waiting for the device (no host synchronisation)."""
        if mask is not None:
            mask.apply(logits)
        params = [s.params for s in seqs]
        wants = [p.logprobs for p in params if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants else None
        logits = self._apply_penalties(logits, seqs)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        # The common all-greedy case takes one batched op.
        tokens = logits.argmax(dim=-1) if len(greedy) == len(params) else self._sample_mixed(logits, seqs, greedy)
        batch = SampledBatch(tokens)
        if raw_logprobs is not None:
            batch.logprob = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
            k = max(wants)
            if k > 0:
                batch.top_logprobs, batch.top_ids = raw_logprobs.topk(k, dim=-1)
        return batch

    def _sample_mixed(self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[int]) -> torch.Tensor:
        dev = logits.device
        params = [s.params for s in seqs]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        some = len(random_rows) < len(seqs)
        probs = _filtered_probs(logits.index_select(0, upload(random_rows, dev)) if some else logits,
                                [params[i] for i in random_rows])
        seeded = [j for j, i in enumerate(random_rows) if seqs[i].generator is not None]
        unseeded = [j for j, i in enumerate(random_rows) if seqs[i].generator is None]
        if not some and not seeded:  # the common all-random case: one draw for the batch
            return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=dev)
        if greedy:
            idx = upload(greedy, dev)
            tokens.index_copy_(0, idx, logits.index_select(0, idx).argmax(dim=-1))
        if unseeded:
            pick = probs if len(unseeded) == len(random_rows) else probs.index_select(0, upload(unseeded, dev))
            draws = torch.multinomial(pick, 1, generator=self.generator).squeeze(1)
            tokens.index_copy_(0, upload([random_rows[j] for j in unseeded], dev), draws)
        for j in seeded:
            gen = seqs[random_rows[j]].generator
            tokens[random_rows[j]] = torch.multinomial(probs[j], 1, generator=gen)[0]
        return tokens

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logit_bias, min_tokens and the penalties, on a copy: the caller's logits stay as the model gave them."""
        copied = False
        for i, seq in enumerate(seqs):
            p = seq.params
            banned = (seq.num_output_tokens < p.min_tokens and (p.stop_token_ids or not p.ignore_eos)
                      and seq.grammar is None)
            penalized = p.repetition_penalty != 1.0 or (
                (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens
            )
            if not (p.logit_bias or banned or penalized):
                continue
            if not copied:
                logits, copied = logits.clone(), True
            if p.logit_bias:
                ids = upload(list(p.logit_bias), logits.device)
                bias = upload(list(p.logit_bias.values()), logits.device, logits.dtype)
                logits[i].index_add_(0, ids, bias)
            if p.repetition_penalty != 1.0:
                seen = upload(sorted(set(seq.token_ids)), logits.device)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
                out = upload(seq.output_token_ids, logits.device)
                counts = torch.zeros_like(logits[i]).index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
            if banned:
                ids = list(p.stop_token_set) + ([] if p.ignore_eos else list(self.eos_token_ids))
                logits[i].index_fill_(0, upload(ids, logits.device), float("-inf"))
        return logits


def upload(values: list[int] | list[float], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A small per-step tensor onto the device without waiting for it: pageable host-to-device copies block
    until the GPU has drained its queue, which would serialise the host and the GPU every step."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def read_logprobs(batch: SampledBatch, rows: list[int | None], tokens: list[int]) -> list[TokenLogprob | None]:
    """Host-side TokenLogprobs of a collected batch; rows[i] is how many alternatives row i asked for."""
    if batch.logprob is None:
        return [None] * len(rows)
    chosen = batch.logprob.tolist()
    top_ids = batch.top_ids.tolist() if batch.top_ids is not None else None
    top_vals = batch.top_logprobs.tolist() if batch.top_logprobs is not None else None
    result: list[TokenLogprob | None] = []
    for i, k in enumerate(rows):
        if k is None:
            result.append(None)
            continue
        top = dict(zip(top_ids[i][:k], top_vals[i][:k], strict=True)) if k and top_ids and top_vals else {}
        result.append(TokenLogprob(tokens[i], chosen[i], top))
    return result


# Prompt rows are scored in slices so a long prompt's logits ([rows, vocab] float32) stay within ~256 MiB.
PROMPT_SLICE_ELEMENTS = 2**26


@dataclass
class PromptLogprobBatch:
    """A step's prompt logprobs, still on the device: each target token's, and the top k alternatives."""

    chosen: torch.Tensor  # [R]
    top_ids: torch.Tensor | None = None  # [R, k]
    top_logprobs: torch.Tensor | None = None


def score_prompt(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, rows: torch.Tensor,
                 targets: torch.Tensor, k: int, vocab_size: int) -> PromptLogprobBatch:
    """Raw-model logprobs of `targets` at hidden `rows` (the prefill's own hidden states), slice by slice."""
    step = max(1, PROMPT_SLICE_ELEMENTS // vocab_size)
    chosen, top_ids, top_vals = [], [], []
    for lo in range(0, rows.shape[0], step):
        logprobs = torch.log_softmax(compute_logits(hidden[rows[lo : lo + step]]), dim=-1)
        chosen.append(logprobs.gather(1, targets[lo : lo + step, None]).squeeze(1))
        if k > 0:
            vals, ids = logprobs.topk(k, dim=-1)
            top_vals.append(vals)
            top_ids.append(ids)
    if not k:
        return PromptLogprobBatch(torch.cat(chosen))
    return PromptLogprobBatch(torch.cat(chosen), torch.cat(top_ids), torch.cat(top_vals))


def read_prompt_logprobs(batch: PromptLogprobBatch, entries: list[tuple[int, int]], targets: list[int]
                         ) -> list[list[TokenLogprob]]:
    """Host-side TokenLogprobs per entry; entries[i] = (rows it holds, alternatives it asked for)."""
    chosen = batch.chosen.tolist()
    top_ids = batch.top_ids.tolist() if batch.top_ids is not None else None
    top_vals = batch.top_logprobs.tolist() if batch.top_logprobs is not None else None
    out: list[list[TokenLogprob]] = []
    row = 0
    for count, k in entries:
        lps = []
        for r in range(row, row + count):
            top = dict(zip(top_ids[r][:k], top_vals[r][:k], strict=True)) if k and top_ids and top_vals else {}
            lps.append(TokenLogprob(targets[r], chosen[r], top))
        out.append(lps)
        row += count
    return out


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    dev = logits.device
    temps = upload([p.temperature for p in params], dev, logits.dtype)
    logits = logits / temps[:, None]
    top_k = [p.top_k for p in params]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        ks = upload([min(k, vocab) if k > 0 else vocab for k in top_k], dev)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (ks - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = upload([p.top_p for p in params], dev, probs.dtype)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        exceeds = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(exceeds, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    if any(p.min_p > 0 for p in params):
        min_p = upload([p.min_p for p in params], dev, probs.dtype)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs
