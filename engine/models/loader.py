"""Weights into our modules: the real safetensors path (single or sharded), or dummy weights for benchmarks.

HF checkpoints keep q/k/v and gate/up as separate tensors, and each expert of an MoE layer as its own
(`experts.{e}.gate_proj`, or Mixtral's `block_sparse_moe.experts.{e}.w1`); ours are fused and stacked, so
each HF tensor names the slice of a parameter it fills. Every parameter must be filled exactly once: a
missing or unexpected tensor is an error, never a silently random weight. FP8 models build their projections as
Fp8Linear and read the stream through engine/quant/fp8_weights.py, which yields their weights and scales.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import torch
from kvpilot.engine.models.arch import ModelArch
from kvpilot.engine.models.llama import CausalLM
from kvpilot.engine.parallel import SINGLE, TPGroup, shard_cols, shard_rows
from kvpilot.engine.quant.fp8_linear import Fp8Linear
from kvpilot.engine.quant.fp8_scheme import Fp8Scheme
from kvpilot.engine.quant.fp8_weights import KVScaleSink, check_tensor_parallel, fp8_stream
from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)

# HF name fragment -> (our fragment, shard index among the fused parts)
_FUSED = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}
# One expert's tensor -> (our stacked parameter, shard index among gate|up)
_EXPERT = re.compile(
    r"^(?P<stack>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$"
)
_EXPERT_PARTS = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                 "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", None), "w2": ("down_proj", None)}


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


def _shard_slice(model: CausalLM, name: str, shard: int, param: torch.Tensor) -> slice:
    """Where q/k/v (or gate/up) sit inside this rank's fused parameter."""
    arch, tp = model.arch, model.tp.size
    if ".qkv_proj." in name:
        q, kv = arch.num_heads * arch.head_dim // tp, arch.num_kv_heads * arch.head_dim // tp
        starts = [0, q, q + kv]
        sizes = [q, kv, kv]
    else:  # gate|up of a dense MLP [2I, H], of the shared expert, or of a stack of experts [E, 2I, H]
        inter = param.shape[-2] // 2
        starts, sizes = [0, inter], [inter, inter]
    return slice(starts[shard], starts[shard] + sizes[shard])


def _rank_part(model: CausalLM, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This tensor-parallel rank's part of a checkpoint tensor (named as ours)."""
    tp = model.tp
    if tp.size == 1:
        return tensor
    if ".qkv_proj." in name or ".gate_up_proj." in name or name.endswith("experts.gate_up_proj"):
        return shard_rows(tensor, tp, tensor.shape[0] // tp.size)
    # FP8 block scales [rows, K-groups] split with their columns; one per row is every column's
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) or (
            name.endswith(("o_proj.weight_scale", "down_proj.weight_scale")) and tensor.shape[1] > 1):
        return shard_cols(tensor, tp)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return shard_rows(tensor, tp, -(-tensor.shape[0] // tp.size))
    return tensor


def _place(hf_name: str) -> tuple[str, int | None, int | None]:
    """(our parameter, expert index or None, shard among the fused parts or None) of a checkpoint tensor."""
    hf_name = hf_name.replace(".block_sparse_moe.", ".mlp.")
    expert = _EXPERT.match(hf_name)
    if expert is not None:
        param, shard = _EXPERT_PARTS[expert["proj"]]
        return f"{expert['stack']}.{param}", int(expert["expert"]), shard
    for frag, (ours, index) in _FUSED.items():
        if frag in hf_name:
            return hf_name.replace(frag, ours), None, index
    return hf_name, None, None


def _expected_parts(name: str, param: torch.Tensor) -> int:
    if name.endswith("experts.gate_up_proj"):
        return 2 * param.shape[0]
    if name.endswith("experts.down_proj"):
        return param.shape[0]
    return 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name else 1


@torch.no_grad()
def _fill(model: CausalLM, tensors: Iterable[tuple[str, torch.Tensor]], source: str, sharded: bool) -> None:
    """Copy HF-named tensors into our (fused, stacked, possibly sharded) parameters; each filled exactly once."""
    params = dict(model.named_parameters())
    filled: dict[str, int] = {}
    for hf_name, tensor in tensors:
        if "rotary_emb" in hf_name:
            continue
        name, expert, shard = _place(hf_name)
        if name == "lm_head.weight" and model.arch.tie_word_embeddings:
            continue
        if name not in params or (expert is not None and expert >= params[name].shape[0]):
            raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {model.arch.model_type} model")
        part = tensor if sharded else _rank_part(model, name, tensor)
        target = params[name] if expert is None else params[name][expert]
        if shard is not None:
            target = target[_shard_slice(model, name, shard, params[name])]
        if tuple(target.shape) != tuple(part.shape):
            raise ValueError(f"{hf_name}: checkpoint shape {tuple(part.shape)} != model {tuple(target.shape)}")
        target.copy_(part.to(target.dtype))
        filled[name] = filled.get(name, 0) + 1
    missing = [n for n, p in params.items() if filled.get(n, 0) != _expected_parts(n, p)]
    if missing:
        raise ValueError(f"{source} lacks weights for {missing[:5]} ({len(missing)} in all)")


def hf_layout(arch: ModelArch) -> Iterator[tuple[str, tuple[int, ...], str | None]]:
    """Every tensor of the HF checkpoint of this architecture: (name, shape, how tensor parallelism splits it)."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv, inter = arch.num_heads * d, arch.num_kv_heads * d, arch.intermediate_size
    yield "model.embed_tokens.weight", (arch.vocab_size, h), "vocab"
    for i in range(arch.num_layers):
        pre = f"model.layers.{i}."
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            yield f"{pre}self_attn.{proj}.weight", (rows, h), "rows"
            if arch.qkv_bias:
                yield f"{pre}self_attn.{proj}.bias", (rows,), "rows"
        yield f"{pre}self_attn.o_proj.weight", (h, q), "cols"
        if arch.qk_norm:
            yield f"{pre}self_attn.q_norm.weight", (d,), None
            yield f"{pre}self_attn.k_norm.weight", (d,), None
        if arch.is_moe_layer(i):
            yield from _moe_layout(arch, pre)
        else:
            yield from _mlp_layout(f"{pre}mlp.", h, inter)
        yield f"{pre}input_layernorm.weight", (h,), None
        yield f"{pre}post_attention_layernorm.weight", (h,), None
    yield "model.norm.weight", (h,), None
    if not arch.tie_word_embeddings:
        yield "lm_head.weight", (arch.vocab_size, h), "vocab"


def _mlp_layout(pre: str, hidden: int, inter: int) -> Iterator[tuple[str, tuple[int, ...], str | None]]:
    yield f"{pre}gate_proj.weight", (inter, hidden), "rows"
    yield f"{pre}up_proj.weight", (inter, hidden), "rows"
    yield f"{pre}down_proj.weight", (hidden, inter), "cols"


def _moe_layout(arch: ModelArch, pre: str) -> Iterator[tuple[str, tuple[int, ...], str | None]]:
    """A routed layer as its family's checkpoints hold it: router, one tensor per expert, the shared expert."""
    h, inter = arch.hidden_size, arch.moe_intermediate_size
    mixtral = arch.model_type == "mixtral"
    moe = f"{pre}block_sparse_moe." if mixtral else f"{pre}mlp."
    yield f"{moe}gate.weight", (arch.num_experts, h), None
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    for e in range(arch.num_experts):
        yield f"{moe}experts.{e}.{gate}.weight", (inter, h), "rows"
        yield f"{moe}experts.{e}.{up}.weight", (inter, h), "rows"
        yield f"{moe}experts.{e}.{down}.weight", (h, inter), "cols"
    if arch.shared_expert_intermediate_size:
        yield from _mlp_layout(f"{moe}shared_expert.", h, arch.shared_expert_intermediate_size)
        yield f"{moe}shared_expert_gate.weight", (1, h), None


_DUMMY_BLOCK = 64  # generated in blocks of rows/columns seeded by their global index, so shards agree


def _dummy_part(
    name: str,
    shape: tuple[int, ...],
    split: str | None,
    tp: TPGroup,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape[0] // tp.size, dtype=dtype, device=device)
    dim = 1 if split == "cols" else 0
    full = shape[dim]
    per = -(-full // tp.size) if split == "vocab" else full // tp.size if split else full
    lo, hi = (tp.rank * per, min(full, (tp.rank + 1) * per)) if split else (0, full)
    gen = torch.Generator(device=device)
    blocks = []
    name_key = zlib.crc32(name.encode())
    for b in range(lo // _DUMMY_BLOCK, -(-hi // _DUMMY_BLOCK)):
        gen.manual_seed((seed * 1_000_003 + name_key) * 65_537 + b)
        block_shape = list(shape)
        block_shape[dim] = _DUMMY_BLOCK
        blocks.append(torch.empty(block_shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=gen))
    part = torch.cat(blocks, dim=dim).narrow(dim, lo - (lo // _DUMMY_BLOCK) * _DUMMY_BLOCK, hi - lo)
    if split == "vocab" and hi - lo < per:  # the last vocabulary shard is zero-padded
        part = torch.cat([part, part.new_zeros(per - (hi - lo), shape[1])])
    return part


def dummy_tensors(model: CausalLM, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights in the real shapes, identical whatever the tensor-parallel size, without a checkpoint."""
    param = next(model.parameters())
    return (
        (name, _dummy_part(name, shape, split, model.tp, seed, param.dtype, param.device))
        for name, shape, split in hf_layout(model.arch)
    )


def load_model(
    model_dir: Path,
    arch: ModelArch,
    *,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str,
    max_positions: int,
    seed: int,
    tp: TPGroup = SINGLE,
    fp8: Fp8Scheme | None = None,
    fp8_gemm: str = "reference",
) -> CausalLM:
    """Build the module directly on the device in the target dtype, then fill its weights (`fp8`: e4m3 ones).

    K/V cache scales the checkpoint carries are kept in `model.checkpoint_kv_scales` for the runner."""
    shapes = {name: shape for name, shape, _ in hf_layout(arch)}
    if fp8 is not None:
        check_tensor_parallel(fp8, shapes, tp.size)
    linear = nn.Linear if fp8 is None else partial(Fp8Linear, group=fp8.group, gemm=fp8_gemm)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CausalLM(arch, max_positions, tp, linear)
    finally:
        torch.set_default_dtype(default_dtype)
    dummy = load_format == "dummy"
    tensors = dummy_tensors(model, seed) if dummy else _iter_tensors(safetensors_files(model_dir))
    if fp8 is not None:
        tensors = fp8_stream(tensors, fp8, shapes, device, dummy)
    sink = KVScaleSink()
    source = "dummy weights" if dummy else f"checkpoint in {str(model_dir)!r}"
    _fill(model, sink.filter(tensors), source, sharded=dummy)
    model.checkpoint_kv_scales = sink.layers
    n_params = sum(p.numel() for p in model.parameters())
    log.info("loaded %s (%.3fB params, %s, %s) from %s", arch.model_type, n_params / 1e9,
             dtype if fp8 is None else f"{dtype}, {fp8.describe()}", load_format, model_dir)
    return model.eval()
