"""Engine and sampling configuration: the tuner's knobs, with vLLM's names and meanings.

Both are pydantic models so a bad value fails at the edge with an error naming the field,
whether it came from Python, the CLI, an HTTP request or an InferenceService spec. EngineConfig declares
each engine knob once: `kvpilot serve/generate/tune` flags (engine/flags.py), the CRD's `spec.engine`
and the pod arguments (operator/engine_knobs.py) are derived from its fields, so every field needs a
description (it becomes the flag's help and the CRD's `kubectl explain` text).
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Literal

from kvpilot.engine.structured.params import StructuredOutputs
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class EngineConfig(BaseModel):
    """How one engine instance loads its model and spends its memory and compute."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(description="Hugging Face model directory, or 'demo' for the embedded demo model")
    revision: str = Field(default="local", description="model revision label reported in metrics")
    served_model_name: str | None = Field(default=None, description="name clients use; default: model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="weights and activations; auto: the checkpoint's 16-bit type on GPU, float32 on CPU"
    )
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        default="auto", description="dummy: random weights in the checkpoint's shapes (benchmarks)"
    )
    quantization: Literal["fp8"] | None = Field(
        default=None,
        description="fp8: e4m3 linear-layer weights, from an FP8 checkpoint or quantized at load (per-channel "
        "scales), with per-token activation scales; unset: as the checkpoint's quantization_config says",
    )
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = Field(
        default="auto",
        description="auto: the model's dtype; fp8 (e4m3): per-head scales from the checkpoint or calibrated at "
        "start-up, twice the tokens of a 16-bit pool in the same memory",
    )
    fp8_gemm_backend: Literal["auto", "scaled_mm", "triton", "reference"] = Field(
        default="auto",
        description="FP8 matmuls. auto: on CUDA, per shape the kernel measured fastest (decode rows: a weight-only "
        "kernel or Triton; more: torch._scaled_mm, Triton for block scales); reference (dequantize, float "
        "matmul) on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: CUDA when one is visible")
    seed: int = Field(default=0, description="seed of the random weights and of unseeded sampling")

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
    max_request_share: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="most of max_num_seqs and of a step's token budget that one request may hold while others wait",
    )
    enable_prefix_caching: bool = Field(default=True, description="reuse the KV blocks of shared prompt prefixes")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one replica's model is split across")
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        default="auto", description="auto: Triton kernels on CUDA, the PyTorch reference on CPU"
    )
    enforce_eager: bool = Field(default=False, description="never capture CUDA graphs")
    async_scheduling: bool = Field(
        default=True, description="prepare the next step on the CPU while the GPU runs this one (outputs unchanged)"
    )
    jump_forward: bool = Field(
        default=True, description="append the tokens a grammar forces without a decoding step for each"
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json"] = Field(
        default="auto", description="the format tool calls are written and read in: hermes (<tool_call> tags, "
        "Qwen), llama3_json (Llama 3.1); auto reads it from the chat template"
    )

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model must name a directory or 'demo'")
        return value

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


# torch.Generator takes seeds in [-2**63, 2**64); the engine adds the sample index (< MAX_N) to the seed.
MAX_N = 128
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1 - MAX_N
# Caps that keep one request's per-step cost bounded: stops are checked on every token.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 4096
MAX_LOGIT_BIAS = 1024
GREEDY_BELOW = 1e-5


class SamplingParams(BaseModel):
    """Per-request decoding settings, as OpenAI and vLLM define them.

    Bounds that need the model (token ids below the vocabulary size, top_k at most the vocabulary) are
    checked by the input processor, which knows it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="0 or -1 disable top-k")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # Logits are divided by it: below 0.01 they overflow to inf (the fuzz test found 5e-324).
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=10.0)
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS
    )
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    max_tokens: int = Field(default=16, ge=0, description="0: compute the prompt (and its logprobs) only")
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20, description="top alternatives returned per token")
    prompt_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="logprobs of the prompt's tokens, with this many alternatives")
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS, description="token id -> bias added to its logit before sampling"
    )
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = Field(
        default=None, description="constrain the output to a JSON schema, regex, choice or grammar")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value

    @model_validator(mode="after")
    def _min_below_max(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.max_tokens == 0 and self.n != 1:
            raise ValueError("max_tokens 0 computes the prompt only: n must be 1")
        return self

    @property
    def greedy(self) -> bool:
        """Temperatures below 1e-5 sample as argmax (as vLLM does): dividing by them overflows to inf/NaN."""
        return self.temperature < GREEDY_BELOW

    @property
    def needs_history(self) -> bool:
        """Whether sampling needs every previous token on the host before the next step is scheduled: penalties
        read them. (A grammar needs only the last one, and only at sampling time: the engine reads it back
        while the next forward runs.)"""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty or self.frequency_penalty)

    @cached_property
    def stop_token_set(self) -> frozenset[int]:
        """stop_token_ids as a set: each sampled token is looked up in it."""
        return frozenset(self.stop_token_ids)
