"""A mixed step through the Triton backend (decode rows to the split-K decode kernel, the chunks after them to
the extend kernel) attends exactly as the reference backend does, with and without a sliding window."""

from __future__ import annotations

import pytest
import torch
from kvpilot.engine.attention.backend import AttentionMetadata
from kvpilot.engine.attention.torch_ref import TorchAttentionBackend
from kvpilot.engine.attention.triton_backend import TritonAttentionBackend

from .helpers import paged_cache, rel_err


@pytest.mark.parametrize("window", [None, 24])
def test_decodes_then_chunks_match_the_reference(window: int | None) -> None:
    gen = torch.Generator().manual_seed(3)
    hq, hkv, d, page = 8, 2, 32, 16
    # (cached tokens, new tokens): three decode rows first, then a prefix-hit chunk and a fresh prefill
    parts = [(40, 1), (1, 1), (130, 1), (32, 21), (0, 17)]
    seq_lens = [c + n for c, n in parts]
    k_cache, v_cache, table = paged_cache(seq_lens, hkv, d, page, torch.float32, gen)
    q_lens = [n for _, n in parts]
    t = sum(q_lens)
    q = torch.randn(t, hq, d, generator=gen)
    k = torch.randn(t, hkv, d, generator=gen)
    v = torch.randn(t, hkv, d, generator=gen)
    slots = []
    for i, (cached, new) in enumerate(parts):
        for pos in range(cached, cached + new):
            slots.append(int(table[i, pos // page]) * page + pos % page)
    cu = torch.zeros(len(parts) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)

    def meta(num_decodes: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64), cu_seqlens_q=cu,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=table, max_query_len=max(q_lens),
            max_seq_len=max(seq_lens), query_lens_cpu=q_lens, seq_lens_cpu=seq_lens, num_decodes=num_decodes,
            prefill_cu_seqlens_q=(cu[num_decodes:] - cu[num_decodes]) if num_decodes else None,
        )  # fmt: skip

    ref = TorchAttentionBackend().forward(q, k, v, k_cache.clone(), v_cache.clone(), meta(0), 0.25, window)
    backend = TritonAttentionBackend()
    backend.split_for = lambda batch: 4  # a pinned split factor, as the captured graphs give it
    for num_decodes in (0, 3):  # one extend launch for everything, or the split
        out = backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta(num_decodes), 0.25, window)
        assert rel_err(out, ref) <= 1e-4, num_decodes
