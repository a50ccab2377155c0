"""The attention interface every backend implements, and the batch metadata it reads.

Layout contract shared by the engine and every kernel:
- queries/keys/values of a step are flat over tokens: q [T, Hq, D], k and v [T, Hkv, D];
- one layer's cache is k_cache, v_cache [num_blocks, block_size, Hkv, D];
- slot = block_id * block_size + offset; slot_mapping [T] (int64) says where each new token's K/V goes;
- sequence i owns query tokens cu_seqlens_q[i]:cu_seqlens_q[i+1] (int32, [B+1]); its context after this
  step is seq_lens[i] tokens (int32, [B]), the first seq_lens[i] - q_len of them already cached;
  block_tables [B, max_blocks] (int32) maps its logical blocks to physical ones.
Attention is causal: the query at context position p sees keys 0..p, or with a sliding window w only keys
p - w + 1..p (so blocks wholly before the window of a sequence's next query are never read, and the KV
manager may free them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # Host copies, so reference code never syncs the device to read lengths.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # The batch's leading sequences that decode one token each (the runner puts them first), and the others'
    # cu_seqlens_q rebased to start at 0: mixed steps send each part to the kernel made for it.
    num_decodes: int = 0
    prefill_cu_seqlens_q: torch.Tensor | None = None

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Stores a step's new K/V into the paged cache, then attends each query over its sequence's context."""

    name: str

    @abstractmethod
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
        """Return [T, Hq, D]. With no cache (the memory-profiling pass) attend within the step only; kv_scales
        matter only to an e4m3 cache."""
