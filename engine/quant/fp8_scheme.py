"""What FP8 a model asks for, from EngineConfig.quantization and the checkpoint's `quantization_config`.

Three sources, as vLLM reads them:
- `quantization="fp8"` over a 16-bit checkpoint: weights quantized at load, one scale per output channel;
- Hugging Face's `quant_method: "fp8"` (e4m3; one scale per tensor, or `weight_block_size` [rows, cols] block
  scales in `weight_scale_inv`, as Qwen3-FP8 and DeepSeek-V3 ship them);
- compressed-tensors `format: "float-quantized"` (llm-compressor): 8-bit float weights with `tensor`,
  `channel`, `group` or `block` scales in `weight_scale`, and optional `k_scale` / `v_scale` for the KV cache.
Activations are always quantized dynamically, per token (per token and K-group with block or group scales): a
checkpoint's static `input_scale` is not used. Pure: reads dicts, raises ValueError naming the field.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kvpilot.engine.models.arch import ModelArch

log = logging.getLogger(__name__)

Layout = Literal["tensor", "channel", "group", "block"]
SUPPORTED_METHODS = ("fp8", "compressed-tensors")
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Fp8Scheme:
    """How the decoder's linear layers hold FP8 weights."""

    source: Literal["dynamic", "fp8", "compressed-tensors"]
    layout: Layout  # how the checkpoint stores weight scales (dynamic: channel)
    block: tuple[int, int] | None = None  # (rows, cols) of a block scale
    group_size: int | None = None  # columns sharing a scale, for group and block layouts

    @property
    def group(self) -> int | None:
        """Columns of K that share one weight (and activation) scale; None: the whole row (per channel)."""
        return self.block[1] if self.block is not None else self.group_size

    @property
    def scale_name(self) -> str:
        """The checkpoint's name for a weight's scale tensor."""
        return "weight_scale_inv" if self.source == "fp8" and self.layout == "block" else "weight_scale"

    def describe(self) -> str:
        shape = {"block": f" {self.block}", "group": f" of {self.group_size}"}.get(self.layout, "")
        return f"fp8 e4m3 weights ({self.source}, {self.layout} scales{shape}), dynamic per-token activations"


def fp8_scheme(quantization: str | None, hf_config: dict[str, Any], arch: ModelArch) -> Fp8Scheme | None:
    """The FP8 scheme to load with, or None for an unquantized model; a checkpoint's own config wins."""
    qc = hf_config.get("quantization_config") or hf_config.get("compression_config")
    if qc is None and quantization != "fp8":
        return None
    if arch.num_experts:
        raise ValueError(f"quantization: FP8 weights cover dense models only; {hf_config.get('model_type')!r} is a "
                         "mixture of experts, whose expert kernels take the model dtype (an FP8 KV cache works)")
    if qc is None:
        return Fp8Scheme("dynamic", "channel")
    method = qc.get("quant_method")
    if method == "fp8":
        scheme = _hf_fp8(qc)
        ignored = qc.get("ignored_layers") or qc.get("modules_to_not_convert") or []
    elif method == "compressed-tensors":
        scheme = _compressed_tensors(qc)
        ignored = qc.get("ignore") or []
    else:
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported: kvpilot loads "
                         f"{' and '.join(map(repr, SUPPORTED_METHODS))} (float-quantized) FP8 checkpoints")
    _check_ignored(ignored, arch)
    return scheme


def read_fp8_scheme(quantization: str | None, model_dir: Path, arch: ModelArch) -> Fp8Scheme | None:
    """fp8_scheme for the checkpoint in `model_dir` (its config.json)."""
    return fp8_scheme(quantization, json.loads((model_dir / "config.json").read_text()), arch)


def _hf_fp8(qc: dict[str, Any]) -> Fp8Scheme:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt {fmt!r} is not supported: kvpilot loads e4m3 FP8")
    if qc.get("activation_scheme", "dynamic") == "static":
        log.info("quantization_config.activation_scheme is static: kvpilot quantizes activations dynamically "
                 "per token and leaves input_scale unused")
    block = qc.get("weight_block_size")
    if block is None:
        return Fp8Scheme("fp8", "tensor")
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"quantization_config.weight_block_size must be [rows, cols] of positive ints, got {block!r}")
    return Fp8Scheme("fp8", "block", block=(block[0], block[1]))


def _compressed_tensors(qc: dict[str, Any]) -> Fp8Scheme:
    fmt = qc.get("format")
    if fmt != "float-quantized":
        raise ValueError(f"quantization_config.format {fmt!r} is not supported: kvpilot loads compressed-tensors "
                         "'float-quantized' FP8 checkpoints")
    groups = qc.get("config_groups") or {}
    schemes = {name: _ct_weights(name, group) for name, group in groups.items()}
    if not schemes:
        raise ValueError("quantization_config.config_groups is empty: no layer says how it is quantized")
    if len(set(schemes.values())) > 1:
        raise ValueError(f"quantization_config.config_groups quantize layers differently ({sorted(schemes)}): "
                         "kvpilot loads one FP8 scheme for every decoder linear")
    return next(iter(schemes.values()))


def _ct_weights(name: str, group: Any) -> Fp8Scheme:
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise ValueError(f"{where}.weights is missing: a float-quantized group needs its weight scheme")
    targets = group.get("targets") or []
    if "Linear" not in targets:
        raise ValueError(f"{where}.targets {targets!r} do not name Linear: kvpilot quantizes the linear layers")
    w = group["weights"]
    if w.get("num_bits") != 8 or w.get("type") != "float":
        raise ValueError(f"{where}.weights is {w.get('num_bits')}-bit {w.get('type')}: kvpilot loads 8-bit float")
    if w.get("dynamic"):
        raise ValueError(f"{where}.weights.dynamic is true: FP8 weights need stored scales")
    strategy = w.get("strategy")
    if strategy in ("tensor", "channel"):
        return Fp8Scheme("compressed-tensors", strategy)
    if strategy == "group":
        size = w.get("group_size")
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"{where}.weights.group_size must be a positive int, got {size!r}")
        return Fp8Scheme("compressed-tensors", "group", group_size=size)
    if strategy == "block":
        block = w.get("block_structure")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"{where}.weights.block_structure must be [rows, cols], got {block!r}")
        return Fp8Scheme("compressed-tensors", "block", block=(block[0], block[1]))
    raise ValueError(f"{where}.weights.strategy {strategy!r} is not supported (tensor, channel, group, block)")


def _check_ignored(ignored: list[str], arch: ModelArch) -> None:
    """Entries may name the LM head or embeddings (never quantized here), not a decoder linear."""
    names = [f"model.layers.{i}.{p}" for i in range(arch.num_layers) for p in _PROJECTIONS]
    for entry in ignored:
        pattern = entry[3:] if entry.startswith("re:") else None
        hit = next((n for n in names if (re.match(pattern, n) if pattern is not None else n == entry
                                         or n.endswith("." + entry))), None)
        if hit is not None:
            raise ValueError(f"quantization_config ignores {entry!r}, which leaves {hit} unquantized: kvpilot "
                             "quantizes every decoder linear layer or none")
