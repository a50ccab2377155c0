"""One description of a decoder-only checkpoint, read from its `config.json`.

Llama 2/3/3.1, Mistral, Qwen2/2.5 and Qwen3 differ only by a few flags (qkv bias, q/k norm,
head_dim, rope scaling, tied embeddings), so one forward pass serves them all. Both the classic
(`rope_theta` + `rope_scaling`) and the transformers-5 (`rope_parameters`) spellings are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
_ROPE_TYPES = {"default", "llama3", "linear"}


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token across all layers, before the dtype's size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(cfg.get("rope_theta") or params.pop("rope_theta", None) or 10000.0)
    params.pop("rope_theta", None)
    scaling = scaling or params
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported (supported: {sorted(_ROPE_TYPES)})")
    scaling["rope_type"] = rope_type
    return theta, scaling


def parse_arch(cfg: dict[str, Any]) -> ModelArch:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "")
    if model_type not in _MODEL_TYPES and not any(a in SUPPORTED for a in archs):
        raise ValueError(f"unsupported architecture {archs or model_type!r}: kvpilot serves {sorted(SUPPORTED)}")
    model_type = model_type if model_type in _MODEL_TYPES else SUPPORTED[next(a for a in archs if a in SUPPORTED)]
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
    return ModelArch(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        eos_token_ids=eos_ids,
        sliding_window=int(window) if window else None,
    )


def load_arch(model_dir: str | Path) -> ModelArch:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model directory {str(model_dir)!r}")
    return parse_arch(json.loads(path.read_text()))
