"""Input processing: everything a request needs before the engine core may see it.

Tokenization and the checks that need the model (token ids inside the vocabulary, top_k at most the
vocabulary, the prompt's size) happen here, with no engine state, so the server runs them off its event
loop and outside the core. A request that passes can no longer make a sampler index out of range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpilot.engine.config import SamplingParams
from kvpilot.engine.errors import RequestRejected
from kvpilot.engine.messages import CoreInfo
from kvpilot.engine.structured import grammar

# A prompt longer than this many characters per token of context can never fit: refuse it before paying
# for its tokenization (a few seconds per megabyte). No common tokenizer averages more than a few.
CHARS_PER_TOKEN_BOUND = 16


@dataclass(frozen=True)
class InputProcessor:
    tokenizer: Any | None
    vocab_size: int
    core: CoreInfo  # the context and KV pool the engine core resolved
    max_prompt_chars: int

    @classmethod
    def for_model(cls, tokenizer: Any | None, vocab_size: int, core: CoreInfo,
                  max_prompt_chars: int | None = None) -> InputProcessor:
        limit = max_prompt_chars or CHARS_PER_TOKEN_BOUND * core.max_model_len
        return cls(tokenizer, vocab_size, core, limit)

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def check_text(self, text: str, param: str = "prompt") -> None:
        if len(text) > self.max_prompt_chars:
            raise RequestRejected(
                f"{param} has {len(text)} characters; at most {self.max_prompt_chars} are accepted "
                f"(this model's context is {self.max_model_len} tokens)",
                param=param,
            )

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise RequestRejected("this model has no tokenizer: send token ids", param="prompt")
        self.check_text(prompt)
        return list(self.tokenizer(prompt).input_ids)

    def tokenize_rendered(self, text: str, param: str) -> list[int]:
        """A chat template's output: its special tokens are already in the text."""
        self.check_text(text, param)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def check(self, token_ids: list[int], params: SamplingParams) -> None:
        """Refuse what would index outside the model's vocabulary or that no sampler could honour."""
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise RequestRejected(f"prompt token ids must lie in [0, {vocab})", param="prompt")
        if any(t >= vocab for t in params.stop_token_ids):
            raise RequestRejected(f"stop_token_ids must lie in [0, {vocab})", param="stop_token_ids")
        if params.logit_bias and any(t >= vocab for t in params.logit_bias):
            raise RequestRejected(f"logit_bias keys must be token ids in [0, {vocab})", param="logit_bias")
        if params.top_k > vocab:
            raise RequestRejected(f"top_k must be at most the vocabulary size ({vocab}), or -1", param="top_k")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise RequestRejected("this model has no tokenizer: its output cannot be constrained",
                                      param="structured_outputs")
            grammar.check(params.structured_outputs, param="structured_outputs")
        check_fits(self.core, len(token_ids), params.max_tokens)

    def process(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        token_ids = self.tokenize(prompt)
        self.check(token_ids, params)
        return token_ids


def check_fits(core: CoreInfo, num_prompt_tokens: int, max_tokens: int) -> None:
    """What could never be served as asked: empty, over max_model_len, or over the whole KV pool."""
    if num_prompt_tokens == 0:
        raise RequestRejected("prompt is empty: send at least one token", param="prompt")
    total = num_prompt_tokens + max_tokens
    if total > core.max_model_len:
        raise RequestRejected(
            f"this model's maximum context length is {core.max_model_len} tokens, but the request asks for "
            f"{total} ({num_prompt_tokens} in the prompt + {max_tokens} max_tokens)",
            param="max_tokens",
        )
    need = -(-(total - 1) // core.block_size)
    if core.max_blocks_per_seq is not None:  # blocks behind the sliding window are given back as it moves
        need = min(need, core.max_blocks_per_seq)
    if need > core.num_kv_blocks:
        raise RequestRejected(
            f"the request needs {need} KV blocks ({total} tokens) but the whole pool holds "
            f"{core.num_kv_blocks}: shorten the prompt or max_tokens",
            param="max_tokens",
        )
