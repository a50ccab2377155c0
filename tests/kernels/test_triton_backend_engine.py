"""The Triton backend inside the real engine (interpreted on CPU): chunked prefill, prefix-cache hits and
decode give the same greedy tokens as the PyTorch reference backend on a tiny fp32 Llama."""

from __future__ import annotations

from pathlib import Path

import torch
from kvpilot.engine import LLM, SamplingParams
from kvpilot.engine.demo import ensure_demo_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def _tiny_llama(root: Path) -> Path:
    config = LlamaConfig(
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
        rope_theta=500000.0,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(7)
    LlamaForCausalLM(config).save_pretrained(root, safe_serialization=True)
    AutoTokenizer.from_pretrained(ensure_demo_model()).save_pretrained(root)
    return root


def test_engine_greedy_tokens_match_reference_backend(tmp_path: Path) -> None:
    model = _tiny_llama(tmp_path / "llama")
    shared = list(range(3, 40))  # 37 tokens: two full blocks reusable from the prefix cache
    prompts = [[*shared, 50, 51], list(range(100, 117)), [*shared, 60], [9]]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            str(model),
            device="cpu",
            dtype="float32",
            attention_backend=backend,
            block_size=16,
            max_num_batched_tokens=24,  # forces chunked prefill of the longer prompts
            max_num_seqs=4,
            enable_prefix_caching=True,
        )
        assert llm.core.runner.backend.name == backend
        first = llm.generate(prompts[:2], params)
        rest = llm.generate(prompts[2:], params)  # the third prompt hits the cached shared prefix
        tokens[backend] = [out.outputs[0].token_ids for out in first + rest]
    assert tokens["triton"] == tokens["torch"]
    assert all(len(t) == 5 for t in tokens["triton"])
