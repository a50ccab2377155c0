"""The e4m3 KV cache's side of the model: its dtype, every attention layer's per-head K and V scales, and whether
the GPU can run FP8 at all.

Scales come from the checkpoint when it ships them (`k_scale` / `v_scale`, one per tensor or per KV head, as
llm-compressor and ModelOpt write them), else they are calibrated at start-up: one forward over seeded random
tokens records each head's largest |K| and |V|, and the scale leaves HEADROOM times that below e4m3's 448.
e4m3 is a float format (3 mantissa bits at every magnitude), so headroom costs precision only in the
subnormal tail; values past it saturate rather than overflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from kvpilot.engine.attention.backend import AttentionBackend, AttentionMetadata
from kvpilot.engine.config import EngineConfig
from kvpilot.engine.models.llama import CausalLM
from kvpilot.engine.parallel import TPGroup
from kvpilot.kernels.fp8_math import FP8_DTYPE, FP8_MAX, MIN_AMAX

FP8_KV = ("fp8", "fp8_e4m3")
HEADROOM = 4.0
FP8_MIN_CAPABILITY = (8, 9)


def kv_cache_dtype(config: EngineConfig, model_dtype: torch.dtype) -> torch.dtype:
    return FP8_DTYPE if config.kv_cache_dtype in FP8_KV else model_dtype


def fp8_fields(config: EngineConfig, weights_fp8: bool) -> list[str]:
    """The EngineConfig fields (or the checkpoint) that ask this engine for FP8."""
    fields = []
    if weights_fp8:
        fields.append(f"quantization={config.quantization!r}" if config.quantization else
                      "the checkpoint's quantization_config (FP8)")
    if config.kv_cache_dtype in FP8_KV:
        fields.append(f"kv_cache_dtype={config.kv_cache_dtype!r}")
    return fields


def fp8_support_error(fields: list[str], capability: tuple[int, int], device_name: str) -> str | None:
    """Why this GPU cannot serve what `fields` ask for, or None: e4m3 needs compute capability 8.9+."""
    if not fields or capability >= FP8_MIN_CAPABILITY:
        return None
    need = ".".join(map(str, FP8_MIN_CAPABILITY))
    return (f"{' and '.join(fields)} needs a GPU with FP8 support (compute capability {need} or newer: Ada, Hopper, "
            f"Blackwell); {device_name} is {capability[0]}.{capability[1]}. Leave quantization unset and "
            "kv_cache_dtype 'auto' (or use a 16-bit checkpoint) on this GPU")


def check_fp8_device(fields: list[str], device: torch.device) -> None:
    if device.type != "cuda" or not fields:
        return
    error = fp8_support_error(fields, torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
    if error is not None:
        raise ValueError(error)


def assign_checkpoint_scales(model: CausalLM, found: dict[int, dict[str, torch.Tensor]], tp: TPGroup) -> None:
    """Copy the checkpoint's K/V scales into every layer (per tensor: repeated over heads; per head: sliced)."""
    layers = model.model.layers
    missing = [i for i in range(len(layers)) if set(found.get(i, {})) != {"k", "v"}]
    if missing:
        raise ValueError(f"checkpoint has KV cache scales, but not k_scale and v_scale for layer {missing[0]} "
                         f"(model.layers.{missing[0]}.self_attn.k_scale / v_scale; {len(missing)} layers lack them)")
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        heads = attn.num_kv_heads
        for kind in ("k", "v"):
            values = found[i][kind]
            if values.numel() == 1:
                local = values.expand(heads)
            elif values.numel() == heads * tp.size:
                local = values[tp.rank * heads : (tp.rank + 1) * heads]
            else:
                raise ValueError(f"model.layers.{i}.self_attn.{kind}_scale has {values.numel()} values: one per "
                                 f"tensor or one per KV head ({heads * tp.size}) expected")
            if not (torch.isfinite(local).all() and (local > 0).all()):
                raise ValueError(f"model.layers.{i}.self_attn.{kind}_scale must be positive and finite")
            getattr(attn, f"{kind}_scale").copy_(local)


class _Recorder(AttentionBackend):
    """Attends as `inner` does, without a cache, and records each call's (that is, each layer's) per-head amax."""

    name = "kv-calibration"

    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner
        self.amax: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None,
                v_cache: torch.Tensor | None, meta: AttentionMetadata, scale: float, window: int | None = None,
                kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        self.amax.append((k.abs().amax(dim=(0, 2)).float(), v.abs().amax(dim=(0, 2)).float()))
        return self.inner.forward(q, k, v, None, None, meta, scale, window)


def calibrate(model: CausalLM, backend: AttentionBackend, forward: Callable[[], None]) -> None:
    """Set every layer's scales from one cache-less `forward` (which must run each layer once)."""
    recorder = _Recorder(backend)
    model.set_attention_backend(recorder)
    try:
        forward()
    finally:
        model.set_attention_backend(backend)
    layers = model.model.layers
    if len(recorder.amax) != len(layers):
        raise RuntimeError(f"calibration saw {len(recorder.amax)} attention calls for {len(layers)} layers")
    for layer, (k_amax, v_amax) in zip(layers, recorder.amax, strict=True):
        layer.self_attn.k_scale.copy_(scale_for(k_amax))
        layer.self_attn.v_scale.copy_(scale_for(v_amax))


def scale_for(amax: torch.Tensor) -> torch.Tensor:
    return amax.clamp_min(MIN_AMAX) * HEADROOM / FP8_MAX
