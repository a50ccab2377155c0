"""Weights into our modules: the real safetensors path (single or sharded), or dummy weights for benchmarks.

HF checkpoints keep q/k/v and gate/up as separate tensors; ours are fused, so each HF tensor names
the slice of a fused parameter it fills. Every parameter must be filled exactly once: a missing or
unexpected tensor is an error, never a silently random weight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from kvpilot.engine.models.arch import ModelArch
from kvpilot.engine.models.llama import CausalLM
from safetensors import safe_open

log = logging.getLogger(__name__)

# HF name fragment -> (our fragment, shard index among the fused parts)
_FUSED = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise FileNotFoundError(
            f"no safetensors weights in {str(model_dir)!r}" + (f" (missing: {missing})" if missing else "")
        )
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def _shard_slice(model: CausalLM, name: str, shard: int) -> slice:
    arch = model.arch
    if ".qkv_proj." in name:
        q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        starts = [0, q, q + kv]
        sizes = [q, kv, kv]
    else:
        starts, sizes = [0, arch.intermediate_size], [arch.intermediate_size] * 2
    return slice(starts[shard], starts[shard] + sizes[shard])


@torch.no_grad()
def load_safetensors(model: CausalLM, model_dir: Path) -> None:
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    expected_parts = {n: 3 if ".qkv_proj." in n else 2 if ".gate_up_proj." in n else 1 for n in params}
    for hf_name, tensor in _iter_tensors(safetensors_files(model_dir)):
        if "rotary_emb" in hf_name:
            continue
        name, shard = hf_name, None
        for frag, (ours, index) in _FUSED.items():
            if frag in hf_name:
                name, shard = hf_name.replace(frag, ours), index
                break
        if name == "lm_head.weight" and model.arch.tie_word_embeddings:
            continue
        if name not in params:
            raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {model.arch.model_type} model")
        target = params[name] if shard is None else params[name][_shard_slice(model, name, shard)]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
        target.copy_(tensor.to(target.dtype))
        filled[name] = filled.get(name, 0) + 1
    missing = [n for n, parts in expected_parts.items() if filled.get(n, 0) != parts]
    if missing:
        raise ValueError(f"checkpoint in {str(model_dir)!r} lacks weights for {missing[:5]} ({len(missing)} in all)")


@torch.no_grad()
def init_dummy(model: CausalLM, seed: int) -> None:
    """Random weights in the real shapes, scaled so activations stay finite through deep stacks."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)


def load_model(
    model_dir: Path,
    arch: ModelArch,
    *,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str,
    max_positions: int,
    seed: int,
) -> CausalLM:
    """Build the module directly on the device in the target dtype, then fill its weights."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CausalLM(arch, max_positions)
    finally:
        torch.set_default_dtype(default_dtype)
    if load_format == "dummy":
        init_dummy(model, seed)
    else:
        load_safetensors(model, model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("loaded %s (%.3fB params, %s, %s) from %s", arch.model_type, n_params / 1e9, dtype, load_format, model_dir)
    return model.eval()
