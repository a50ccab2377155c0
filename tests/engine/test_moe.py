"""Mixture-of-experts models: config parsing and its errors, which layers route, the checkpoint layout the
loader expects (the one transformers writes), dummy weights in these shapes, sharded checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from kvpilot.engine import LLM, SamplingParams
from kvpilot.engine.models.arch import load_arch, parse_arch
from kvpilot.engine.models.loader import hf_layout
from kvpilot.engine.parallel import check_divisible
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from tests.conftest import FAMILIES

CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4)


def test_benchmark_shapes_parse() -> None:
    qwen = load_arch(CONFIGS / "qwen3-30b-a3b")
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size) == (128, 8, 768)
    assert qwen.norm_topk_prob and qwen.qk_norm and all(qwen.moe_layers) and qwen.kv_window is None
    mixtral = load_arch(CONFIGS / "mixtral-8x7b")
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size) == (8, 2, 14336)
    assert mixtral.norm_topk_prob and all(mixtral.moe_layers) and mixtral.shared_expert_intermediate_size == 0
    params = sum(_numel(shape) for _, shape, _ in hf_layout(mixtral))
    assert 46e9 < params < 47.5e9, "Mixtral-8x7B holds about 46.7B parameters (93 GB in bf16)"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.parametrize(("step", "dense"), [(1, []), (2, []), (1, [0, 3]), (2, [1])])
def test_routed_layers_follow_decoder_sparse_step_and_mlp_only_layers(step: int, dense: list[int]) -> None:
    config = Qwen2MoeConfig(**BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                            shared_expert_intermediate_size=8, decoder_sparse_step=step, mlp_only_layers=dense)
    hf = Qwen2MoeForCausalLM(config)
    expected = tuple(isinstance(layer.mlp, Qwen2MoeSparseMoeBlock) for layer in hf.model.layers)
    arch = parse_arch({**config.to_dict(), "architectures": ["Qwen2MoeForCausalLM"]})
    assert arch.moe_layers == expected


def test_bad_configs_get_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unsupported model_type 'deepseek_v3'.*qwen3_moe"):
        parse_arch({**BASE, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]})
    mixtral = {**BASE, "model_type": "mixtral", "num_local_experts": 4}
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(5\) must lie between 1 and the number of experts"):
        parse_arch({**mixtral, "num_experts_per_tok": 5})
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(0\)"):
        parse_arch({**mixtral, "num_experts_per_tok": 0})
    qwen = {**BASE, "model_type": "qwen3_moe", "num_experts": 8, "moe_intermediate_size": 12}
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(9\)"):
        parse_arch({**qwen, "num_experts_per_tok": 9})
    with pytest.raises(ValueError, match="decoder_sparse_step"):
        parse_arch({**qwen, "num_experts_per_tok": 2, "decoder_sparse_step": 0})
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        check_divisible(parse_arch({**qwen, "num_experts_per_tok": 2, "moe_intermediate_size": 6}), 4)


def test_unknown_model_type_refuses_to_load(tiny_model, tmp_path: Path) -> None:
    config = json.loads((tiny_model("mixtral") / "config.json").read_text())
    config.update(model_type="grok", architectures=["GrokForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model_type 'grok'"):
        LLM(str(tmp_path), load_format="dummy")


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_is_what_transformers_saves(tiny_model, family: str) -> None:
    """The names and shapes dummy weights are made in, and every checkpoint must hold, for each family."""
    model_dir = tiny_model(family)
    saved = {}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            saved[name] = tuple(f.get_slice(name).get_shape())
    ours = {name: shape for name, shape, _ in hf_layout(load_arch(model_dir))}
    assert ours == saved


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_dummy_weights_in_moe_shapes(tiny_model, tmp_path: Path, family: str) -> None:
    shutil.copy(tiny_model(family) / "config.json", tmp_path / "config.json")
    llm = LLM(str(tmp_path), load_format="dummy")
    out = llm.generate([[1, 2, 3], list(range(4, 40))], GREEDY)
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)
    experts = llm.core.runner.model.model.layers[0].mlp.experts.gate_up_proj
    assert experts.std().item() > 0.01 and torch.isfinite(experts).all()


def test_sharded_moe_checkpoint_loads_the_same_weights(tiny_model, tmp_path: Path) -> None:
    single = tiny_model("qwen2_moe")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 2
    prompts = [[1, 2, 3, 4, 5], list(range(10, 40))]
    a = [o.outputs[0].token_ids for o in LLM(str(single)).generate(prompts, GREEDY)]
    b = [o.outputs[0].token_ids for o in LLM(str(sharded)).generate(prompts, GREEDY)]
    assert a == b


def test_a_checkpoint_missing_an_expert_is_refused(tiny_model, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model_dir = tiny_model("mixtral")
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"lacks weights for \['model.layers.1.mlp.experts.down_proj'\]"):
        LLM(str(tmp_path))
