"""Tiny FP8 checkpoints in each Hugging Face format kvpilot loads, written from a 16-bit tiny model.

Each projection weight is quantized here in plain PyTorch (kernels/fp8_math.py) the way the format's tools
store it; `dequantized` keeps what each e4m3 weight times its scale is, the reference a loaded model must match.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from kvpilot.kernels.fp8_math import FP8_MAX, to_fp8
from safetensors.torch import load_file, save_file

BLOCK = (32, 32)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_CT_GROUP = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False},
             "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}

FORMATS: dict[str, dict[str, Any]] = {
    "fp8-tensor": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "static"},
    "fp8-block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                  "weight_block_size": list(BLOCK)},
    "ct-channel": {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                   "config_groups": {"group_0": {**_CT_GROUP, "weights": {**_CT_GROUP["weights"],
                                                                          "strategy": "channel"}}},
                   "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}},
}


def _is_projection(name: str) -> bool:
    return name.endswith("_proj.weight") and name.split(".")[-2] in PROJECTIONS


def _quantize(fmt: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 weight, the scale tensor as the format stores it, per-element scales)."""
    if fmt == "fp8-tensor":
        scale = (w.abs().amax() / FP8_MAX).reshape(())
        return to_fp8(w, scale), scale, scale.expand_as(w)
    if fmt == "ct-channel":
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
        return to_fp8(w, scale), scale, scale.expand_as(w)
    rows, cols = BLOCK
    blocks = w.unflatten(0, (-1, rows)).unflatten(2, (-1, cols))  # [R, rows, C, cols]
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [R, C]: weight_scale_inv
    full = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return to_fp8(w, full), scale, full


def write_fp8_checkpoint(src: Path, out: Path, fmt: str, kv_scales: bool = False) -> dict[str, torch.Tensor]:
    """Write `src` as an FP8 checkpoint in `out`; returns each projection's dequantized float32 weight."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    written: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not _is_projection(name):
            written[name] = t
            continue
        q, stored, full = _quantize(fmt, t.float())
        written[name] = q
        prefix = name[: -len("weight")]
        written[prefix + ("weight_scale_inv" if fmt == "fp8-block" else "weight_scale")] = stored.contiguous()
        if fmt == "fp8-tensor":
            written[prefix + "input_scale"] = torch.tensor(0.01)
        dequantized[name] = q.float() * full
    if kv_scales:
        for layer in {n.split(".")[2] for n in tensors if n.startswith("model.layers.")}:
            written[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.05)
            written[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(0.02)
    save_file(written, out / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = FORMATS[fmt]
    (out / "config.json").write_text(json.dumps(config))
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out)
    return dequantized


def write_dequantized(src: Path, out: Path, dequantized: dict[str, torch.Tensor]) -> None:
    """`src` with each projection replaced by its dequantized FP8 weight: the unquantized reference model."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    save_file({n: dequantized.get(n, t).to(t.dtype).contiguous() for n, t in tensors.items()},
              out / "model.safetensors")
    shutil.copy(src / "config.json", out / "config.json")
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out)
