"""Engine and sampling configuration: the tuner's knobs, with vLLM's names and meanings.

Both are pydantic models so a bad value fails at the edge with an error naming the field,
whether it came from Python, the CLI, an HTTP request or an InferenceService spec.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class EngineConfig(BaseModel):
    """How one engine instance loads its model and spends its memory and compute."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(description="Hugging Face model directory, or 'demo' for the embedded demo model")
    revision: str = Field(default="local", description="model revision label reported in metrics")
    served_model_name: str | None = Field(default=None, description="name clients use; default: model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    block_size: int = Field(default=16, ge=1, le=1024, description="tokens per KV-cache block")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="fraction of GPU memory the engine may use in all"
    )
    num_kv_blocks: int | None = Field(default=None, ge=1, description="explicit KV pool size (overrides sizing)")
    kv_cache_memory_bytes: int | None = Field(
        default=None, ge=1, description="KV pool byte budget (CPU default: 256 MiB)"
    )
    max_num_seqs: int = Field(default=256, ge=1, description="most sequences in one step")
    max_num_batched_tokens: int = Field(
        default=8192, ge=1, description="token budget of one step: the prefill chunk size"
    )
    max_model_len: int | None = Field(default=None, ge=1, description="longest prompt + output; default: model's")
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = Field(default=1, ge=1)
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    enforce_eager: bool = Field(default=False, description="never capture CUDA graphs")

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model must name a directory or 'demo'")
        return value

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


class SamplingParams(BaseModel):
    """Per-request decoding settings, as OpenAI and vLLM define them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(default=1, ge=1, le=128)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="0 or -1 disable top-k")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    max_tokens: int = Field(default=16, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20, description="top alternatives returned per token")
    skip_special_tokens: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _min_below_max(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
