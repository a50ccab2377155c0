"""Greedy continuations from transformers' own generate(): what the engine's outputs are held to."""

from __future__ import annotations

from functools import cache

import torch
from transformers import AutoModelForCausalLM


@cache
def hf_greedy(model_dir: str, prompts: tuple[tuple[int, ...], ...], max_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(gen[0, len(prompt) :].tolist())
    return outs
