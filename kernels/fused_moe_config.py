"""Tile configurations of the fused MoE kernels, per model shape, device and token count, kept as vLLM keeps them.

A table is one JSON file per (experts, per-rank intermediate size, device, dtype), named
`E={E},N={N},device_name={device},dtype={dtype}.json` (the device name as torch reports it, spaces as
underscores), in `kernels/fused_moe_configs/` or the folder `$KVPILOT_FUSED_MOE_CONFIGS` names. Its keys are
token counts (as strings); each value holds BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps
and num_stages. A batch of M tokens takes the entry whose key is nearest M (vLLM's rule); without a table the
heuristic below is used. `bench/tune_fused_moe.py` measures and writes tables: it needs the GPU.

The few-token path (moe_gemv.py: one program per routed pair, no sort) has tiles of its own, a `GemvConfig`
for each of its two kernels, kept in the same folder as `gemv,<table name>` with keys "gate_up" and "down".
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "fused_moe_configs"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _powers_of_two(config: object, names: tuple[str, ...], least: int, why: str = "") -> None:
    """A tile's sizes must be powers of two of at least `least` (Triton's aranges and dots ask for it)."""
    for name in names:
        value = getattr(config, name)
        if value < least or value & (value - 1):
            raise ValueError(f"{name} must be a power of two{why}, got {value}")


@dataclass(frozen=True)
class MoEConfig:
    BLOCK_SIZE_M: int
    BLOCK_SIZE_N: int
    BLOCK_SIZE_K: int
    GROUP_SIZE_M: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        _powers_of_two(self, ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"), 16, " >= 16 (tl.dot's minimum)")
        if self.GROUP_SIZE_M < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"GROUP_SIZE_M, num_warps and num_stages must be positive: {self}")

    def to_json(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class GemvConfig:
    """One few-token kernel's tile: BLOCK_N output units per program, BLOCK_K inputs per step of its loop."""

    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4

    def __post_init__(self) -> None:
        _powers_of_two(self, ("BLOCK_N", "BLOCK_K", "num_warps"), 1)

    def to_json(self) -> dict[str, int]:
        return asdict(self)


# Untuned: 16-row tiles give a one-token Qwen3-30B-A3B layer 384 gate/up and 1,024 down programs to stream with.
DEFAULT_GEMV = {"gate_up": GemvConfig(16, 256, 4), "down": GemvConfig(16, 256, 4)}


def table_name(num_experts: int, n: int, device_name: str, dtype: torch.dtype) -> str:
    return f"E={num_experts},N={n},device_name={device_name.replace(' ', '_')},dtype={_DTYPE_NAMES[dtype]}.json"


@cache
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def parse_table(raw: dict[str, dict[str, int]]) -> dict[int, MoEConfig]:
    """A table's JSON as {token count: config}; a malformed entry names its key."""
    table = {}
    for key, value in raw.items():
        try:
            table[int(key)] = MoEConfig(**value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fused MoE config entry {key!r}: {exc}") from exc
    if not table:
        raise ValueError("a fused MoE config table needs at least one entry")
    return table


def table_path(name: str) -> Path:
    """Where a table of this name lives: $KVPILOT_FUSED_MOE_CONFIGS when set, else CONFIG_DIR."""
    return Path(os.environ.get("KVPILOT_FUSED_MOE_CONFIGS") or CONFIG_DIR) / name


@cache
def load_table(name: str) -> dict[int, MoEConfig] | None:
    path = table_path(name)
    if not path.is_file():
        return None
    return parse_table(json.loads(path.read_text()))


@cache
def gemv_configs(num_experts: int, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, GemvConfig]:
    """The few-token kernels' tiles for this shape and device: the tuned table's, else DEFAULT_GEMV."""
    path = table_path("gemv," + table_name(num_experts, n, device_name(device), dtype))
    if not path.is_file():
        return DEFAULT_GEMV
    raw = json.loads(path.read_text())
    try:
        return {kernel: GemvConfig(**raw[kernel]) for kernel in DEFAULT_GEMV}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"few-token MoE tile table {str(path)!r}: {exc!r}") from exc


def default_config(num_tokens: int, num_experts: int) -> MoEConfig:
    """vLLM's untuned default: small tiles while tokens per expert are few, larger ones after."""
    if num_tokens <= num_experts:
        return MoEConfig(16, 32, 64, 1, 4, 3)
    return MoEConfig(64, 64, 32, 8, 4, 3)


def pick(table: dict[int, MoEConfig], num_tokens: int) -> MoEConfig:
    return table[min(table, key=lambda m: abs(m - num_tokens))]


def get_config(num_tokens: int, num_experts: int, n: int, dtype: torch.dtype, device: torch.device) -> MoEConfig:
    table = load_table(table_name(num_experts, n, device_name(device), dtype))
    return pick(table, num_tokens) if table is not None else default_config(num_tokens, num_experts)


def uses_gemv(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether a batch takes the few-token path: while the pairs number at most half the experts, few experts
    are hit twice, so reading an expert's weights once per pair costs little over once per expert."""
    return 0 < tokens * top_k <= num_experts // 2


def warm_up_batches(max_tokens: int, top_k: int, num_experts: int, n: int, dtype: torch.dtype,
                    device: torch.device) -> list[int]:
    """Batch sizes that together compile every kernel and tile a batch of 1..max_tokens tokens can take: one
    few-token batch (its kernels do not specialise on the count), then the smallest batch of each sorted tile."""
    gemv = [1] if uses_gemv(1, top_k, num_experts) else []
    first = next((m for m in range(1, max_tokens + 1) if not uses_gemv(m, top_k, num_experts)), None)
    if first is None:
        return gemv
    return gemv + list(distinct_configs(max_tokens, num_experts, n, dtype, device, min_tokens=first).values())


def distinct_configs(max_tokens: int, num_experts: int, n: int, dtype: torch.dtype,
                     device: torch.device, min_tokens: int = 1) -> dict[MoEConfig, int]:
    """Each config some batch of min_tokens..max_tokens tokens takes, with the smallest such batch: what
    warm-up runs (below min_tokens the few-token path takes the batch, without these tiles)."""
    found: dict[MoEConfig, int] = {}
    for m in range(min_tokens, max_tokens + 1):
        found.setdefault(get_config(m, num_experts, n, dtype, device), m)
    return found
