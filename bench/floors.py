"""Physical floors for a workload on a device: what no engine can beat, from measured bandwidth and peak.

The model of an ideal run: every request starts at once; prefill is pure compute; each decode step
reads all weights once plus the KV of every active sequence, and does 2 x params flops per active
token; a step takes the larger of its memory time and its compute time.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpilot.engine.models.arch import ModelArch


@dataclass(frozen=True)
class Device:
    bandwidth_Bps: float  # measured HBM bytes/s
    peak_flops: float  # measured dense bf16 flop/s


def param_count(arch: ModelArch) -> int:
    h, i, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    embed = v * h * (1 if arch.tie_word_embeddings else 2)
    return arch.num_layers * per_layer + embed + h


def kv_bytes_per_token(arch: ModelArch, dtype_bytes: int = 2) -> int:
    return arch.kv_bytes_per_token * dtype_bytes


def decode_step_floor_s(arch: ModelArch, dev: Device, batch: int, context: int, dtype_bytes: int = 2) -> float:
    """One decode step of `batch` sequences each with `context` cached tokens."""
    params = param_count(arch)
    mem = (params * dtype_bytes + batch * context * kv_bytes_per_token(arch, dtype_bytes)) / dev.bandwidth_Bps
    flops = 2 * params * batch + 4 * batch * context * arch.num_heads * arch.head_dim * arch.num_layers
    return max(mem, flops / dev.peak_flops)


def workload_floor_s(
    arch: ModelArch, dev: Device, requests: list[tuple[int, int]], max_num_seqs: int, dtype_bytes: int = 2
) -> float:
    """Floor for (prompt_len, output_len) requests served max_num_seqs at a time."""
    params = param_count(arch)
    prefill_tokens = sum(p for p, _ in requests)
    total = 2 * params * prefill_tokens / dev.peak_flops
    for start in range(0, len(requests), max_num_seqs):
        wave = requests[start : start + max_num_seqs]
        for t in range(max(o for _, o in wave)):
            active = [(p, o) for p, o in wave if o > t]
            ctx = sum(p + t for p, _ in active) // len(active)
            total += decode_step_floor_s(arch, dev, len(active), ctx, dtype_bytes)
    return total
