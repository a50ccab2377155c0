"""Checkpoint tensors -> Fp8Linear's weights and scales, as a filter on the loader's stream of (name, tensor).

The loader fuses, shards and copies whatever this yields, so every FP8 rule lives here:
- a 16-bit checkpoint under `quantization="fp8"`: each projection weight is quantized whole, one scale per
  output row, before tensor parallelism slices it, so every rank holds exactly its slice of one quantization;
- an FP8 checkpoint: e4m3 weights pass through, and each scale tensor becomes [rows, K-groups] (a per-tensor
  scale repeated down the rows, a block scale down its block's rows); a weight without its scale is an error;
  static `input_scale`s are dropped (activations are quantized per token);
- dummy weights: the random 16-bit shards quantized with one fixed scale, so shards agree at any TP size;
- `k_scale` / `v_scale` (and the older `k_proj.output_scale`) go to a KVScaleSink, not into parameters.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

import torch
from kvpilot.engine.quant.fp8_scheme import Fp8Scheme
from kvpilot.kernels.fp8_math import FP8_DTYPE, FP8_MAX, num_groups, quantize_groups, to_fp8

log = logging.getLogger(__name__)

Tensors = Iterable[tuple[str, torch.Tensor]]
_KV_SCALE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(?:(k|v)_scale|(k|v)_proj\.output_scale)$")
# Dummy weights are N(0, 0.02): six standard deviations fit in e4m3's range with this one scale.
DUMMY_SCALE = 6 * 0.02 / FP8_MAX


def is_projection(name: str) -> bool:
    return name.endswith("_proj.weight") and ".layers." in name


def scale_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "weight_scale"


class KVScaleSink:
    """The checkpoint's per-layer K/V cache scales, as they were found: {layer: {"k": t, "v": t}}."""

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, torch.Tensor]] = {}

    def filter(self, tensors: Tensors) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            match = _KV_SCALE.match(name)
            if match is None:
                yield name, tensor
                continue
            kind = match.group(2) or match.group(3)
            self.layers.setdefault(int(match.group(1)), {})[kind] = tensor.detach().float().reshape(-1)


def quantize_checkpoint(tensors: Tensors, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """A 16-bit checkpoint quantized at load: one scale per output row of each whole projection weight."""
    for name, tensor in tensors:
        if not is_projection(name):
            yield name, tensor
            continue
        if tensor.dtype == FP8_DTYPE:
            raise ValueError(f"{name} is already float8 but config.json has no quantization_config saying how")
        q, scales = quantize_groups(tensor.to(device), tensor.shape[1])
        yield name, q
        yield scale_name(name), scales


def fp8_checkpoint(tensors: Tensors, scheme: Fp8Scheme, shapes: dict[str, tuple[int, ...]]
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """An FP8 checkpoint's tensors with every scale in Fp8Linear's [rows, K-groups] layout."""
    weights: set[str] = set()
    scaled: set[str] = set()
    dropped = 0
    for name, tensor in tensors:
        if is_projection(name):
            if tensor.dtype != FP8_DTYPE:
                raise ValueError(f"{name} is {tensor.dtype}, but quantization_config says the checkpoint's "
                                 "linear weights are float8_e4m3fn")
            weights.add(name)
            yield name, tensor
        elif name.endswith((".weight_scale", ".weight_scale_inv")) and _weight_of(name) in shapes:
            weight = _weight_of(name)
            scaled.add(weight)
            yield scale_name(weight), scale_rows(name, tensor, scheme, shapes[weight])
        elif name.endswith(".input_scale"):
            dropped += 1
        else:
            yield name, tensor
    missing = sorted(weights - scaled)
    if missing:
        raise ValueError(f"checkpoint lacks {_weight_scale(missing[0], scheme)} for the FP8 weight {missing[0]} "
                         f"({len(missing)} weights without scales; quantization_config.quant_method "
                         f"{'fp8' if scheme.source == 'fp8' else 'compressed-tensors'}, {scheme.layout} scales)")
    if dropped:
        log.info("left %d static input_scale tensors unused: activations are quantized per token", dropped)


def _weight_of(scale: str) -> str:
    return scale.rsplit(".", 1)[0] + ".weight"


def _weight_scale(weight: str, scheme: Fp8Scheme) -> str:
    return weight[: -len("weight")] + scheme.scale_name


def scale_rows(name: str, scale: torch.Tensor, scheme: Fp8Scheme, shape: tuple[int, ...]) -> torch.Tensor:
    """A checkpoint's weight scale as float32 [rows, ceil(cols / group)] for a weight of `shape`."""
    rows, cols = shape
    scale = scale.float()
    if scheme.layout == "tensor":
        expected: tuple[int, ...] = (1,)
        ok = scale.numel() == 1
        out = scale.reshape(1, 1).expand(rows, 1) if ok else scale
    elif scheme.layout == "channel":
        expected, ok = (rows, 1), scale.numel() == rows
        out = scale.reshape(rows, 1)
    elif scheme.layout == "group":
        assert scheme.group_size is not None
        expected = (rows, num_groups(cols, scheme.group_size))
        ok, out = tuple(scale.shape) == expected, scale
    else:
        assert scheme.block is not None
        block_rows, block_cols = scheme.block
        expected = (num_groups(rows, block_rows), num_groups(cols, block_cols))
        ok = tuple(scale.shape) == expected
        out = scale.repeat_interleave(block_rows, dim=0)[:rows] if ok else scale
    if not ok:
        raise ValueError(f"{name} has shape {tuple(scale.shape)}; {scheme.layout} scales of a {rows}x{cols} weight "
                         f"are {expected}")
    return out.contiguous()


def quantize_dummy(tensors: Tensors, scheme: Fp8Scheme) -> Iterator[tuple[str, torch.Tensor]]:
    """Random shards in FP8 with DUMMY_SCALE: the same values whatever the tensor-parallel size."""
    for name, tensor in tensors:
        if not is_projection(name):
            yield name, tensor
            continue
        rows, cols = tensor.shape
        groups = 1 if scheme.group is None or scheme.group >= cols else num_groups(cols, scheme.group)
        scales = torch.full((rows, groups), DUMMY_SCALE, dtype=torch.float32, device=tensor.device)
        yield name, to_fp8(tensor, DUMMY_SCALE)
        yield scale_name(name), scales


def check_tensor_parallel(scheme: Fp8Scheme, shapes: dict[str, tuple[int, ...]], tp_size: int) -> None:
    """Column-split projections (o_proj, down_proj) must split on K-group boundaries."""
    group = scheme.group
    if group is None or tp_size == 1:
        return
    for name, shape in shapes.items():
        if not name.endswith(("o_proj.weight", "down_proj.weight")):
            continue
        cols = shape[1]
        if cols % tp_size or (cols // tp_size) % group:
            field = "weight_block_size" if scheme.layout == "block" else "group_size"
            raise ValueError(f"tensor_parallel_size {tp_size} splits {name}'s {cols} input columns into shards "
                             f"that do not hold whole {group}-column scale groups (quantization_config {field})")


def fp8_stream(tensors: Tensors, scheme: Fp8Scheme, shapes: dict[str, tuple[int, ...]], device: torch.device,
               dummy: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The loader's stream for an FP8 model: dummy shards, a 16-bit checkpoint quantized now, or an FP8 one."""
    if dummy:
        return quantize_dummy(tensors, scheme)
    if scheme.source == "dynamic":
        return quantize_checkpoint(tensors, device)
    return fp8_checkpoint(tensors, scheme, shapes)
