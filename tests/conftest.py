"""Suite-wide settings and fixtures, applied before any test module imports triton, transformers or the engine."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Build the demo model once per machine for the whole suite.
os.environ.setdefault("KVPILOT_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kvpilot-test-cache"))
# CI has no GPU: Triton kernels run in its CPU interpreter. This must precede the first import of triton,
# which transformers may trigger from any test folder.
os.environ["TRITON_INTERPRET"] = "1"
# e2e/ is a folder run with `python -m e2e`, not an installed package; its API server also serves the
# operator's tests. Appended after the standard library, so the root's `operator/` folder shadows nothing.
sys.path.append(str(Path(__file__).resolve().parents[1]))

# Tiny random checkpoints of each supported family, saved with transformers' own save_pretrained.

import pytest
import torch
from kvpilot.engine.demo import ensure_demo_model
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)


def _configs() -> dict[str, tuple[type, object]]:
    return {
        "llama": (
            LlamaForCausalLM,
            LlamaConfig(
                **COMMON,
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 256,
                },
            ),
        ),
        "mistral": (MistralForCausalLM, MistralConfig(**COMMON, sliding_window=None)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**COMMON, use_sliding_window=False, tie_word_embeddings=False)),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True)),
        # A window shorter than most prompts and wider than a block: blocks behind it are freed mid-sequence.
        "mistral_window": (MistralForCausalLM, MistralConfig(**COMMON, sliding_window=20)),
        # Qwen2's rule: layers from max_window_layers on slide, the others attend to everything.
        "qwen2_window": (
            Qwen2ForCausalLM,
            Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=20, max_window_layers=1,
                        tie_word_embeddings=False),
        ),
        "mixtral": (MixtralForCausalLM, MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)),
        # Routed layers 0 and 2 with a gated shared expert; layer 1 dense (mlp_only_layers).
        "qwen2_moe": (
            Qwen2MoeForCausalLM,
            Qwen2MoeConfig(**{**COMMON, "num_hidden_layers": 3}, num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=32, shared_expert_intermediate_size=96, mlp_only_layers=[1],
                           use_sliding_window=False, tie_word_embeddings=False),
        ),
        "qwen3_moe": (
            Qwen3MoeForCausalLM,
            Qwen3MoeConfig(**COMMON, head_dim=32, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
                           norm_topk_prob=True, tie_word_embeddings=False),
        ),
    }


FAMILIES = tuple(_configs())


def build(family: str, root: Path) -> Path:
    out = root / family
    if (out / "config.json").is_file():
        return out
    cls, config = _configs()[family]
    config.architectures = [cls.__name__]
    torch.manual_seed(1234)
    model = cls(config)
    with torch.no_grad():  # biases start at zero; give Qwen2's qkv bias real values so it is tested
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(ensure_demo_model()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("models")

    def get(family: str) -> Path:
        return build(family, root)

    return get
