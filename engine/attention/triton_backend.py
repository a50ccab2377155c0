"""Attention through kvpilot's Triton kernels: the default backend on CUDA.

Each step first writes its new K/V into the paged cache; decode rows take the split-K paged decode kernel
(GQA-packed: each K/V row is read once for all the query heads sharing it) and prefill chunks the extend
kernel. A mixed step sends its leading decode rows to the first and the rest to the second: the extend
kernel reads K/V once per query head, four times the traffic for Llama's 32/8 heads. With no cache (the
memory-profiling pass) each sequence attends within its own step tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from kvpilot.engine.attention.backend import AttentionBackend, AttentionMetadata
from kvpilot.kernels.extend_attention import extend_attention, varlen_causal_attention
from kvpilot.kernels.paged_decode_attention import paged_decode_attention
from kvpilot.kernels.store_kvcache import store_kvcache


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, decode_num_splits: int | None = None) -> None:
        """decode_num_splits pins the split-K factor (e.g. under CUDA graphs); None picks it per step.

        `split_for` maps a decode batch to the factor a captured graph of that size uses: mixed steps then
        launch only kernel variants compiled before ready, never a new one under load.
        """
        self.decode_num_splits = decode_num_splits
        self.split_for: Callable[[int], int] | None = None

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
        kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if k_cache is None or v_cache is None:
            return varlen_causal_attention(q, k, v, meta.cu_seqlens_q, meta.max_query_len, scale, window=window)
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, kv_scales)
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
                window=window,
                kv_scales=kv_scales,
            )
        nd = meta.num_decodes
        if nd == 0 or meta.prefill_cu_seqlens_q is None:
            return extend_attention(
                q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables, meta.max_query_len, scale,
                window=window, kv_scales=kv_scales,
            )  # fmt: skip
        out = torch.empty_like(q)
        out[:nd] = paged_decode_attention(
            q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
            num_splits=self.split_for(nd) if self.split_for is not None else None, max_seq_len=meta.max_seq_len,
            window=window,
            kv_scales=kv_scales,
        )  # fmt: skip
        # Fresh copies, not views: Triton specialises on 16-byte pointer alignment, and a view starting at an
        # odd row would compile a new kernel variant mid-load (seen on the H200: 0.5 s TTFT p95 after ready).
        out[nd:] = extend_attention(
            q[nd:], k_cache, v_cache, meta.prefill_cu_seqlens_q, meta.seq_lens[nd:].clone(),
            meta.block_tables[nd:].clone(), meta.max_query_len, scale, window=window, kv_scales=kv_scales,
        )  # fmt: skip
        return out
