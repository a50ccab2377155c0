"""From logits to tokens, per request: logit_bias, penalties, min_tokens, temperature, top-k/top-p/min-p, seeds,
logprobs.

Logprobs are reported from the raw model distribution (before penalties and temperature), as vLLM does.
A seeded sample draws only from its own generator, one draw per token, so its tokens do not depend
on which other requests share the batch; unseeded rows draw together from the engine's generator.
"""

from __future__ import annotations

import torch
from kvpilot.engine.outputs import TokenLogprob
from kvpilot.engine.request import Sequence


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], device: torch.device, seed: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        params = [s.params for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
        logits = self._apply_penalties(logits, seqs)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        if len(greedy) == len(params):  # the common cases take one batched op
            token_list = logits.argmax(dim=-1).tolist()
            return token_list, self._logprobs(raw_logprobs, token_list, params)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if greedy:
            idx = torch.tensor(greedy, device=logits.device)
            tokens[idx] = logits[idx].argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            probs = _filtered_probs(logits[random_rows], [params[i] for i in random_rows])
            seeded = [j for j, i in enumerate(random_rows) if seqs[i].generator is not None]
            unseeded = [j for j, i in enumerate(random_rows) if seqs[i].generator is None]
            if unseeded:
                draws = torch.multinomial(probs[unseeded], 1, generator=self.generator).squeeze(1)
                tokens[torch.tensor([random_rows[j] for j in unseeded], device=logits.device)] = draws
            for j in seeded:
                gen = seqs[random_rows[j]].generator
                tokens[random_rows[j]] = torch.multinomial(probs[j], 1, generator=gen)[0]
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw_logprobs, token_list, params)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logit_bias, min_tokens and the penalties, on a copy: the caller's logits stay as the model gave them."""
        copied = False
        for i, seq in enumerate(seqs):
            p = seq.params
            banned = seq.num_output_tokens < p.min_tokens and (p.stop_token_ids or not p.ignore_eos)
            penalized = p.repetition_penalty != 1.0 or (
                (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens
            )
            if not (p.logit_bias or banned or penalized):
                continue
            if not copied:
                logits, copied = logits.clone(), True
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
                bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
                logits[i].index_add_(0, ids, bias)
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq.token_ids)), device=logits.device)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
                out = torch.tensor(seq.output_token_ids, device=logits.device)
                counts = torch.zeros_like(logits[i]).index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
            if banned:
                ids = list(p.stop_token_set) + ([] if p.ignore_eos else list(self.eos_token_ids))
                logits[i, torch.tensor(ids, dtype=torch.long, device=logits.device)] = float("-inf")
        return logits

    @staticmethod
    def _logprobs(raw: torch.Tensor | None, tokens: list[int], params: list) -> list[TokenLogprob | None]:
        if raw is None:
            return [None] * len(tokens)
        result: list[TokenLogprob | None] = []
        for i, (tok, p) in enumerate(zip(tokens, params, strict=True)):
            if p.logprobs is None:
                result.append(None)
                continue
            top: dict[int, float] = {}
            if p.logprobs > 0:
                vals, ids = raw[i].topk(p.logprobs)
                top = dict(zip(ids.tolist(), vals.tolist(), strict=True))
            result.append(TokenLogprob(tok, float(raw[i, tok]), top))
        return result


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
    logits = logits / temps[:, None]
    top_k = [p.top_k for p in params]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device).clamp(max=vocab)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (ks - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=probs.dtype)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        exceeds = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(exceeds, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=logits.device, dtype=probs.dtype)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs
