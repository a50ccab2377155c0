"""TritonAttentionBackend: store then attend, for decode-only, mixed and no-cache (profiling) steps."""

from __future__ import annotations

import torch
from kvpilot.engine.attention.backend import AttentionMetadata
from kvpilot.engine.attention.triton_backend import TritonAttentionBackend
from kvpilot.kernels.extend_attention import varlen_causal_attention_ref

from .helpers import paged_cache, rel_err

HQ, HKV, D, PAGE = 4, 2, 32, 16


def _step(cached: list[int], new: list[int], gen: torch.Generator) -> tuple:
    """A step over sequences with `cached` tokens already in the cache and `new` tokens arriving."""
    seq_lens = [c + n for c, n in zip(cached, new, strict=True)]
    k_cache, v_cache, table = paged_cache(seq_lens, HKV, D, PAGE, torch.float32, gen)
    cu = torch.zeros(len(new) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(new).cumsum(0)
    slots = []
    for i, (c, n) in enumerate(zip(cached, new, strict=True)):
        pos = torch.arange(c, c + n)
        slots.append(table[i, pos // PAGE].long() * PAGE + pos % PAGE)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots),
        cu_seqlens_q=cu,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=table,
        max_query_len=max(new),
        max_seq_len=max(seq_lens),
        query_lens_cpu=new,
        seq_lens_cpu=seq_lens,
    )
    t = sum(new)
    q, k, v = (torch.randn(t, h, D, generator=gen) for h in (HQ, HKV, HKV))
    return q, k, v, k_cache, v_cache, meta


def _dense_ref(q, k, v, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
    """Each sequence's whole context (cache prefix + this step's K/V) attended causally in plain PyTorch."""
    out = torch.empty_like(q)
    cu = meta.cu_seqlens_q.tolist()
    for i, ctx in enumerate(meta.seq_lens_cpu):
        pos = torch.arange(ctx - (cu[i + 1] - cu[i]))
        slots = meta.block_tables[i, pos // PAGE].long() * PAGE + pos % PAGE
        keys = torch.cat((k_cache.flatten(0, 1)[slots], k[cu[i] : cu[i + 1]]))
        vals = torch.cat((v_cache.flatten(0, 1)[slots], v[cu[i] : cu[i + 1]]))
        scores = torch.einsum("qhd,khd->hqk", q[cu[i] : cu[i + 1]], keys.repeat_interleave(HQ // HKV, 1)) * 0.2
        n = cu[i + 1] - cu[i]
        mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[cu[i] : cu[i + 1]] = torch.einsum("hqk,khd->qhd", probs, vals.repeat_interleave(HQ // HKV, 1))
    return out


def test_decode_only_step() -> None:
    q, k, v, k_cache, v_cache, meta = _step([0, 15, 40], [1, 1, 1], torch.Generator().manual_seed(0))
    assert meta.is_decode_only
    ref = _dense_ref(q, k, v, k_cache, v_cache, meta)
    out = TritonAttentionBackend(decode_num_splits=2).forward(q, k, v, k_cache, v_cache, meta, 0.2)
    assert rel_err(out, ref) <= 1e-5
    assert torch.equal(k_cache.flatten(0, 1)[meta.slot_mapping], k)


def test_mixed_step() -> None:
    q, k, v, k_cache, v_cache, meta = _step([0, 32, 7], [20, 9, 1], torch.Generator().manual_seed(1))
    ref = _dense_ref(q, k, v, k_cache, v_cache, meta)
    out = TritonAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 0.2)
    assert rel_err(out, ref) <= 1e-5
    assert torch.equal(v_cache.flatten(0, 1)[meta.slot_mapping], v)


def test_profiling_pass_attends_within_step() -> None:
    q, k, v, _, _, meta = _step([0, 0], [5, 17], torch.Generator().manual_seed(2))
    out = TritonAttentionBackend().forward(q, k, v, None, None, meta, 0.2)
    ref = varlen_causal_attention_ref(q, k, v, meta.cu_seqlens_q, meta.max_query_len, 0.2)
    assert rel_err(out, ref) <= 1e-5
