"""Benchmark workloads: the exact prompts and output lengths a load test sends, reproducible from a seed.

Random and shared-prefix prompts are token ids, so input lengths are exact without a tokenizer on
the client side (the load generator must not need torch or transformers). File prompts are taken
as they are.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class BenchRequest(BaseModel):
    prompt: str | list[int]
    max_tokens: int = Field(ge=1)


class _Workload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_prompts: int = Field(default=100, ge=1)
    seed: int = 0


class RandomWorkload(_Workload):
    kind: Literal["random"] = "random"
    min_input_len: int = Field(default=128, ge=1)
    max_input_len: int = Field(default=128, ge=1)
    min_output_len: int = Field(default=64, ge=1)
    max_output_len: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> RandomWorkload:
        if self.min_input_len > self.max_input_len or self.min_output_len > self.max_output_len:
            raise ValueError("each min length must not exceed its max")
        return self

    def build(self, vocab_size: int) -> list[BenchRequest]:
        rng = random.Random(self.seed)
        return [
            BenchRequest(
                prompt=[rng.randrange(vocab_size) for _ in range(rng.randint(self.min_input_len, self.max_input_len))],
                max_tokens=rng.randint(self.min_output_len, self.max_output_len),
            )
            for _ in range(self.num_prompts)
        ]


class SharedPrefixWorkload(_Workload):
    """`num_groups` random prefixes, each shared by `prompts_per_group` prompts; arrival order shuffled."""

    kind: Literal["shared-prefix"] = "shared-prefix"
    num_prompts: int = Field(default=0, ge=0, description="ignored: num_groups x prompts_per_group")
    num_groups: int = Field(default=4, ge=1)
    prompts_per_group: int = Field(default=16, ge=1)
    prefix_len: int = Field(default=512, ge=1)
    suffix_len: int = Field(default=32, ge=1)
    output_len: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _count(self) -> SharedPrefixWorkload:
        self.num_prompts = self.num_groups * self.prompts_per_group
        return self

    def build(self, vocab_size: int) -> list[BenchRequest]:
        rng = random.Random(self.seed)
        requests = []
        for _ in range(self.num_groups):
            prefix = [rng.randrange(vocab_size) for _ in range(self.prefix_len)]
            for _ in range(self.prompts_per_group):
                suffix = [rng.randrange(vocab_size) for _ in range(self.suffix_len)]
                requests.append(BenchRequest(prompt=prefix + suffix, max_tokens=self.output_len))
        rng.shuffle(requests)
        return requests


class FileWorkload(_Workload):
    """JSONL, one object per line: {"prompt": text or token ids, "max_tokens": optional}; cycled to num_prompts."""

    kind: Literal["file"] = "file"
    path: Path
    output_len: int = Field(default=64, ge=1, description="max_tokens for lines that give none")
    shuffle: bool = False

    def build(self, vocab_size: int) -> list[BenchRequest]:
        del vocab_size
        lines = []
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read workload file {self.path}: {exc}") from exc
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                if isinstance(raw, dict):
                    raw.setdefault("max_tokens", self.output_len)
                lines.append(BenchRequest.model_validate(raw))
            except (json.JSONDecodeError, ValidationError) as exc:
                raise ValueError(f"{self.path}:{number}: not a prompt object: {exc}") from exc
        if not lines:
            raise ValueError(f"{self.path} holds no prompts")
        if self.shuffle:
            random.Random(self.seed).shuffle(lines)
        return [lines[i % len(lines)] for i in range(self.num_prompts)]


Workload = Annotated[RandomWorkload | SharedPrefixWorkload | FileWorkload, Field(discriminator="kind")]
