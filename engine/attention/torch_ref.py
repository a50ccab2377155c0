"""Reference attention over the paged cache in plain PyTorch: one sequence at a time, obviously right.

It runs on CPU and CUDA and is what every faster backend is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kvpilot.engine.attention.backend import AttentionBackend, AttentionMetadata


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    valid = slots >= 0
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    flat_k[slots[valid]] = k[valid]
    flat_v[slots[valid]] = v[valid]


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
    ) -> torch.Tensor:
        if k_cache is not None and v_cache is not None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
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
