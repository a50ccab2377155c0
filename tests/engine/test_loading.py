"""The real loading paths: sharded safetensors, dtypes, dummy weights, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from kvpilot.engine import LLM, SamplingParams
from kvpilot.engine.models.arch import load_arch, parse_arch
from transformers import AutoModelForCausalLM

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 40))]


def test_sharded_checkpoint_loads_the_same_weights(tiny_model, tmp_path: Path) -> None:
    single = tiny_model("qwen2")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="100KB")
    for f in single.glob("tokenizer*"):
        shutil.copy(f, sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = [o.outputs[0].token_ids for o in LLM(str(single)).generate(PROMPTS, GREEDY)]
    b = [o.outputs[0].token_ids for o in LLM(str(sharded)).generate(PROMPTS, GREEDY)]
    assert a == b


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(tiny_model, dtype: str) -> None:
    llm = LLM(str(tiny_model("qwen3")), dtype=dtype)
    assert llm.core.runner.dtype == getattr(torch, dtype)
    out = llm.generate(PROMPTS, GREEDY)
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)


def test_dummy_weights_need_only_config(tiny_model, tmp_path: Path) -> None:
    shutil.copy(tiny_model("llama") / "config.json", tmp_path / "config.json")
    llm = LLM(str(tmp_path), load_format="dummy")
    out = llm.generate(PROMPTS, GREEDY)
    assert all(len(o.outputs[0].token_ids) == 8 and o.outputs[0].text == "" for o in out)


def test_missing_weights_are_an_error(tiny_model, tmp_path: Path) -> None:
    shutil.copy(tiny_model("llama") / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        LLM(str(tmp_path))


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        parse_arch({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_benchmark_shapes_parse() -> None:
    root = Path(__file__).resolve().parents[2] / "bench" / "configs"
    for path in sorted(root.glob("*/config.json")):
        arch = load_arch(path.parent)
        assert arch.num_layers > 0 and arch.head_dim * arch.num_heads >= arch.hidden_size // 2
    llama8b = parse_arch(json.loads((root / "llama-3.1-8b" / "config.json").read_text()))
    assert (llama8b.num_kv_heads, llama8b.rope_scaling["rope_type"]) == (8, "llama3")
    qwen = parse_arch(json.loads((root / "qwen3-0.6b" / "config.json").read_text()))
    assert qwen.qk_norm and qwen.head_dim == 128 and qwen.tie_word_embeddings
