"""KV-cache store: every valid slot written, padding slots (-1) and untouched slots left alone."""

from __future__ import annotations

import pytest
import torch
from kvpilot.kernels.store_kvcache import store_kvcache, store_kvcache_ref

from .helpers import DTYPES


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [16, 32])
def test_store_matches_reference(dtype: torch.dtype, page: int) -> None:
    gen = torch.Generator().manual_seed(page)
    hkv, d, num_blocks = 2, 32, 4
    kv = torch.randn(7, 2 * hkv * d, generator=gen).to(dtype)
    k, v = kv[:, : hkv * d].view(7, hkv, d), kv[:, hkv * d :].view(7, hkv, d)  # token-strided views
    # block-boundary slots (page - 1, page), the first and the last slot, and one padding token
    slots = torch.tensor([0, page - 1, page, 2 * page + 3, -1, 3 * page, num_blocks * page - 1])
    k_cache = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, page, hkv, d, generator=gen).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kvcache(k, v, k_cache, v_cache, slots)
    store_kvcache_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


def test_store_single_token_int32_slots() -> None:
    k_cache, v_cache = torch.zeros(2, 16, 1, 16), torch.zeros(2, 16, 1, 16)
    k, v = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    store_kvcache(k, v, k_cache, v_cache, torch.tensor([17], dtype=torch.int32))
    assert torch.equal(k_cache[1, 1], k[0]) and torch.equal(v_cache[1, 1], v[0])
    assert k_cache.abs().sum() == k.abs().sum()


def test_store_rejects_mismatched_cache() -> None:
    with pytest.raises(ValueError, match="caches"):
        kv, cache = torch.randn(1, 2, 16), torch.zeros(1, 16, 1, 16)
        store_kvcache(kv, kv, cache, cache, torch.tensor([0]))
