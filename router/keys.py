"""What a request is routed by: its prompt's token ids (hence block names) or, failing those, its leading text.

A body the router cannot read still goes to an engine (by load), which answers it with its own error:
the engine is the judge of what is valid. Only the first prompt of a batched completion keys it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from kvpilot.engine.block_hash import prefix_block_hashes
from kvpilot.engine.server.protocol import ChatMessage
from kvpilot.router.tokenizer import PromptTokenizer
from pydantic import ValidationError


@dataclass
class RouteKey:
    token_ids: list[int] | None = None  # the prompt as the engine will see it, when the router can tell
    text: str | None = None  # otherwise its text, for consistent hashing by leading characters
    _hashes: dict[int, list[int]] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids or ())

    def block_hashes(self, block_size: int) -> list[int]:
        """Names of the blocks an engine can serve from cache: full blocks before the last prompt token."""
        if self.token_ids is None:
            return []
        hashes = self._hashes.get(block_size)
        if hashes is None:
            count = (len(self.token_ids) - 1) // block_size
            try:
                hashes = prefix_block_hashes(self.token_ids, block_size, count)
            except (OverflowError, TypeError):  # token ids no vocabulary has: the engine will refuse them
                hashes = []
            self._hashes[block_size] = hashes
        return hashes

    def hash_key(self, block_size: int, prefix_blocks: int, prefix_chars: int) -> int | None:
        """The consistent-hashing key: the name of the leading `prefix_blocks` blocks (fewer if the prompt is
        shorter), else of the leading characters; None when the request has no prompt to key."""
        hashes = self.block_hashes(block_size)
        if hashes:
            return hashes[min(prefix_blocks, len(hashes)) - 1]
        if self.token_ids is None and self.text:
            digest = hashlib.blake2b(self.text[:prefix_chars].encode("utf-8", "replace"), digest_size=8).digest()
            return int.from_bytes(digest, "little")
        return None


def _first_prompt(prompt: Any) -> str | list[int] | None:
    """`prompt` as OpenAI allows it: text, token ids, or a batch of either."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], int):  # token ids; hashing rejects a list that is not all ids
            return prompt
        return _first_prompt(prompt[0]) if isinstance(prompt[0], str | list) else None
    return None


def _completion_key(body: dict[str, Any], tokenizer: PromptTokenizer | None) -> RouteKey:
    prompt = _first_prompt(body.get("prompt"))
    if isinstance(prompt, list):
        return RouteKey(token_ids=prompt)
    if isinstance(prompt, str):
        return RouteKey(token_ids=tokenizer.encode(prompt)) if tokenizer else RouteKey(text=prompt)
    return RouteKey()


def _chat_key(body: dict[str, Any], tokenizer: PromptTokenizer | None) -> RouteKey:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        return RouteKey()
    try:
        messages = [{"role": m.role, "content": m.text()} for m in map(ChatMessage.model_validate, raw)]
    except ValidationError:
        return RouteKey()
    add_generation_prompt = body.get("add_generation_prompt", True)
    if tokenizer is not None and isinstance(add_generation_prompt, bool):
        token_ids = tokenizer.encode_chat(messages, add_generation_prompt)
        if token_ids is not None:
            return RouteKey(token_ids=token_ids)
    return RouteKey(text="".join(f"<{m['role']}>{m['content']}" for m in messages))


def route_key(path: str, body: Any, tokenizer: PromptTokenizer | None) -> RouteKey:
    if not isinstance(body, dict):
        return RouteKey()
    if path.endswith("/chat/completions"):
        return _chat_key(body, tokenizer)
    if path.endswith("/completions"):
        return _completion_key(body, tokenizer)
    return RouteKey()


def rendezvous(key: int, name: str) -> int:
    """Highest-random-weight score of a backend for a key: the best-scoring backend owns the key, and adding
    or removing one backend moves only the keys it owns."""
    digest = hashlib.blake2b(key.to_bytes(8, "little") + name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
