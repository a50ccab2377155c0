"""One description of a decoder-only checkpoint, read from its `config.json`.

Llama 2/3/3.1, Mistral, Qwen2/2.5 and Qwen3 differ only by a few flags (qkv bias, q/k norm,
head_dim, rope scaling, tied embeddings), so one forward pass serves them all. Mixtral, Qwen2-MoE and
Qwen3-MoE add routed experts (moe.py) in the layers `moe_layers` marks; Qwen2-MoE adds a gated shared
expert. Sliding windows are per layer, as transformers' `layer_types` says. Both the classic
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
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_MODEL_TYPES = set(SUPPORTED.values())
_MOE_TYPES = {"mixtral", "qwen2_moe", "qwen3_moe"}
_ROPE_TYPES = {"default", "llama3", "linear"}


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # of the dense MLP layers
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
    # Sliding-window attention per layer: the query at position p sees keys p - w + 1 .. p; None sees all.
    layer_windows: tuple[int | None, ...] = ()
    # Mixture of experts: which layers route, and the experts' shape (0 experts: a dense model).
    moe_layers: tuple[bool, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0: none

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token across all layers, before the dtype's size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @property
    def kv_window(self) -> int | None:
        """The window every layer attends within, when every layer slides: KV blocks behind it can be freed.

        With one full-attention layer among them every block stays (the pool is shared by all layers).
        """
        windows = self.layer_windows
        if not windows or any(w is None for w in windows):
            return None
        return max(w for w in windows if w is not None)

    def is_moe_layer(self, index: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[index]


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


def _model_type(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "")
    if model_type in _MODEL_TYPES:
        return str(model_type)
    known = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if known is None:
        raise ValueError(
            f"unsupported model_type {model_type!r} (architectures {archs}): kvpilot serves model types "
            f"{sorted(_MODEL_TYPES)}, i.e. {sorted(SUPPORTED)}"
        )
    return known


def _layer_windows(cfg: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window, by transformers' rules for the family (its `layer_types` when given)."""
    use = cfg.get("use_sliding_window", model_type in ("mistral", "mixtral"))
    window = cfg.get("sliding_window")
    if not use or not window:
        return (None,) * num_layers
    if int(window) < 1:
        raise ValueError(f"sliding_window must be a positive number of tokens, got {window}")
    if model_type not in ("qwen2", "qwen3", "qwen2_moe"):  # these families slide in every layer
        return (int(window),) * num_layers
    types = cfg.get("layer_types")
    if types is None:
        max_window_layers = int(cfg.get("max_window_layers", 28))
        if model_type == "qwen2_moe":
            types = ["sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full_attention"
                     for i in range(num_layers)]  # fmt: skip
        else:
            types = ["sliding_attention" if i >= max_window_layers else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def _moe_fields(cfg: dict[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """Experts, top-k and which layers route; errors name the config field at fault."""
    if model_type not in _MOE_TYPES:
        return {}
    # Mixtral's name is num_local_experts, Qwen's num_experts; transformers 5 writes either for Qwen3-MoE.
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    top_k = int(cfg.get("num_experts_per_tok") or 0)
    if experts < 0:
        raise ValueError(f"the number of experts must not be negative, got {experts}")
    if experts and not 1 <= top_k <= experts:
        raise ValueError(
            f"num_experts_per_tok ({top_k}) must lie between 1 and the number of experts ({experts})"
        )
    if model_type == "mixtral":
        moe = (experts > 0,) * num_layers
        return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=int(cfg["intermediate_size"]),
                    norm_topk_prob=True, moe_layers=moe)  # fmt: skip
    step = cfg.get("decoder_sparse_step")
    step = 1 if step is None else int(step)
    if step < 1:
        raise ValueError(f"decoder_sparse_step must be at least 1, got {step}")
    dense = set(cfg.get("mlp_only_layers") or [])
    moe = tuple(experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    shared = int(cfg.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), moe_layers=moe,
                shared_expert_intermediate_size=shared)  # fmt: skip


def parse_arch(cfg: dict[str, Any]) -> ModelArch:
    model_type = _model_type(cfg)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    theta, scaling = _rope(cfg)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    qwen2ish = model_type in ("qwen2", "qwen2_moe")
    return ModelArch(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        qkv_bias=bool(cfg.get("qkv_bias", cfg.get("attention_bias", qwen2ish))),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        eos_token_ids=eos_ids,
        layer_windows=_layer_windows(cfg, model_type, layers),
        **_moe_fields(cfg, model_type, layers),
    )


def load_arch(model_dir: str | Path) -> ModelArch:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model directory {str(model_dir)!r}")
    return parse_arch(json.loads(path.read_text()))
