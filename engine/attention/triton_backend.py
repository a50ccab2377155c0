"""Attention through kvpilot's Triton kernels: the default backend on CUDA.

Each step first writes its new K/V into the paged cache; decode-only batches then take the split-K paged
decode kernel, and batches holding any prefill chunk take the extend kernel, which also serves their
decode rows. With no cache (the memory-profiling pass) each sequence attends within its own step tokens.
"""

from __future__ import annotations

import torch
from kvpilot.engine.attention.backend import AttentionBackend, AttentionMetadata
from kvpilot.kernels.extend_attention import extend_attention, varlen_causal_attention
from kvpilot.kernels.paged_decode_attention import paged_decode_attention
from kvpilot.kernels.store_kvcache import store_kvcache


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, decode_num_splits: int | None = None) -> None:
        """decode_num_splits pins the split-K factor (e.g. under CUDA graphs); None picks it per step."""
        self.decode_num_splits = decode_num_splits

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
        if k_cache is None or v_cache is None:
            return varlen_causal_attention(q, k, v, meta.cu_seqlens_q, meta.max_query_len, scale)
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode_only:
            return paged_decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                num_splits=self.decode_num_splits,
                max_seq_len=meta.max_seq_len,
            )
        return extend_attention(
            q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, meta.max_query_len, scale
        )
