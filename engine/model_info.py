"""What both sides of the engine need to know about a model before anything runs: where it is, its shape,
the context it may use, its tokenizer and its end-of-sequence tokens.

The front (tokenization, detokenization) and the core (scheduling, the forward) each resolve it; neither
loads weights here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpilot.engine.config import EngineConfig
from kvpilot.engine.demo import resolve_model_path
from kvpilot.engine.models.arch import ModelArch, load_arch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    config: EngineConfig  # with max_model_len resolved
    model_dir: Path
    arch: ModelArch

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len or self.arch.max_position_embeddings


def resolve(config: EngineConfig) -> ModelInfo:
    model_dir = resolve_model_path(config.model)
    arch = load_arch(model_dir)
    max_len = config.max_model_len or arch.max_position_embeddings
    if max_len > arch.max_position_embeddings:
        raise ValueError(
            f"max_model_len ({max_len}) exceeds the model's max_position_embeddings ({arch.max_position_embeddings})"
        )
    return ModelInfo(config.model_copy(update={"max_model_len": max_len}), model_dir, arch)


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def load_tokenizer(model_dir: Path) -> Any | None:
    if not has_tokenizer(model_dir):
        log.warning("no tokenizer in %s: prompts must be token ids and outputs carry no text", model_dir)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def eos_token_ids(info: ModelInfo, tokenizer: Any | None) -> tuple[int, ...]:
    """config.json's, generation_config.json's and the tokenizer's end-of-sequence ids, together."""
    ids = set(info.arch.eos_token_ids)
    gen_cfg = info.model_dir / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    eos_tok = getattr(tokenizer, "eos_token_id", None)
    if eos_tok is not None:
        ids.add(eos_tok)
    return tuple(sorted(ids))
