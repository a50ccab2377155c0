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
    ) -> torch.Tensor:
        if k_cache is not None and v_cache is not None:
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
            qs = q[start : start + q_len]
            if k_cache is None or v_cache is None:
                ks, vs = k[start : start + q_len], v[start : start + q_len]
            else:
                block_size = k_cache.shape[1]
                blocks = meta.block_tables[i, : -(-seq_len // block_size)].long()
                ks = k_cache[blocks].flatten(0, 1)[:seq_len]
                vs = v_cache[blocks].flatten(0, 1)[:seq_len]
            out[start : start + q_len] = _attend(qs, ks, vs, scale)
            start += q_len
        return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last len(q) positions over all len(k) keys; GQA by head groups."""
    q_len, kv_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    positions = torch.arange(kv_len - q_len, kv_len, device=q.device)
    mask = torch.arange(kv_len, device=q.device)[None, :] <= positions[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)
