"""Reference attention over the paged cache in plain PyTorch: one sequence at a time, obviously right.

It runs on CPU and CUDA and is what every faster backend is checked against. An e4m3 cache is written and read
through kernels/fp8_math.py, the definition the Triton kernels match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kvpilot.engine.attention.backend import AttentionBackend, AttentionMetadata
from kvpilot.kernels.fp8_math import dequantize_heads, is_fp8, quantize_heads

KVScales = tuple[torch.Tensor, torch.Tensor] | None


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
    kv_scales: KVScales = None,
) -> None:
    valid = slots >= 0
    k, v = k[valid], v[valid]
    if is_fp8(k_cache.dtype):
        k_scale, v_scale = _scales(kv_scales)
        k, v = quantize_heads(k, k_scale), quantize_heads(v, v_scale)
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k[slots[valid]] = k
    flat_v[slots[valid]] = v


def _scales(kv_scales: KVScales) -> tuple[torch.Tensor, torch.Tensor]:
    if kv_scales is None:
        raise ValueError("an e4m3 KV cache needs the layer's k and v scales")
    return kv_scales


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        kv_scales: KVScales = None,
    ) -> torch.Tensor:
        if k_cache is not None and v_cache is not None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping, kv_scales)
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
            qs = q[start : start + q_len]
            if k_cache is None or v_cache is None:
                ks, vs = k[start : start + q_len], v[start : start + q_len]
            else:  # only the blocks holding keys some query here sees: the ones before may be freed
                block_size = k_cache.shape[1]
                lo = max(0, seq_len - q_len - window + 1) if window else 0
                first = lo // block_size
                blocks = meta.block_tables[i, first : -(-seq_len // block_size)].long()
                ks = k_cache[blocks].flatten(0, 1)[lo - first * block_size : seq_len - first * block_size]
                vs = v_cache[blocks].flatten(0, 1)[lo - first * block_size : seq_len - first * block_size]
                if is_fp8(k_cache.dtype):
                    k_scale, v_scale = _scales(kv_scales)
                    ks, vs = dequantize_heads(ks, k_scale, q.dtype), dequantize_heads(vs, v_scale, q.dtype)
            out[start : start + q_len] = _attend(qs, ks, vs, scale, window)
            start += q_len
        return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """Causal attention of the last len(q) positions over the len(k) keys (within `window`); GQA by head groups."""
    q_len, kv_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    positions = torch.arange(kv_len - q_len, kv_len, device=q.device)
    keys = torch.arange(kv_len, device=q.device)[None, :]
    mask = keys <= positions[:, None]
    if window:
        mask &= keys > positions[:, None] - window
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)
