"""FP8 kernels under the Triton interpreter against their PyTorch references: activation quantization, the
FP8 GEMM (per-channel and block scales), and the e4m3 KV cache through store, paged decode and extend."""

from __future__ import annotations

import pytest
import torch
from kvpilot.kernels.extend_attention import extend_attention, extend_attention_ref
from kvpilot.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from kvpilot.kernels.fp8_math import FP8_DTYPE, FP8_MAX, dequantize_groups, quantize_groups, quantize_heads
from kvpilot.kernels.fp8_quant import quantize_rows, quantize_rows_ref
from kvpilot.kernels.fp8_weight_only import fp8_weight_only_gemm, fp8_weight_only_gemm_ref
from kvpilot.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from kvpilot.kernels.store_kvcache import store_kvcache, store_kvcache_ref

from .helpers import DTYPES, TOL, paged_cache, rel_err

D = 32


def test_e4m3_rounding_matches_torch_across_binades() -> None:
    """Round-ups that carry into the exponent (124.3 -> 128), subnormals, saturation: bit for bit torch's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2, 4096, generator=gen) * 60, torch.randn(2, 4096, generator=gen) * 1e-3], dim=1)
    x[0, :6] = torch.tensor([124.3, 127.9, 447.9, 2.0**-10, 3 * 2.0**-11, 0.0])
    q, s = quantize_rows(x)
    q_ref, s_ref = quantize_rows_ref(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.float(), q_ref.float())  # values, not bits: the interpreter's rounding drops -0's sign


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [None, 16, 48])
def test_activation_quantization(dtype: torch.dtype, group: int | None) -> None:
    """Per token and per token-group (48 leaves a partial last group of 80 columns); a zero row stays zero."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(9, 80, generator=gen) * 3).to(dtype)
    x[4] = 0
    q, s = quantize_rows(x, group)
    q_ref, s_ref = quantize_rows_ref(x, group)
    assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())
    assert q.float()[4].abs().sum() == 0
    if group != 48:  # each group's largest value maps to e4m3's largest
        per_group = q.float().abs().unflatten(1, (-1, group or 80)).amax(-1)[torch.arange(9) != 4]
        assert torch.equal(per_group, torch.full_like(per_group, FP8_MAX))
    back = dequantize_groups(q, s, group or 80, torch.float32)
    assert rel_err(back, x.float()) < 0.05


@pytest.mark.parametrize(("m", "n", "k", "group"), [(1, 96, 64, None), (5, 48, 80, None), (33, 64, 128, 32),
                                                   (70, 40, 96, 32), (3, 32, 256, 128)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm(m: int, n: int, k: int, group: int | None, out_dtype: torch.dtype) -> None:
    """Decode-sized and prefill-sized M (every tile variant), per-channel and block scales, a bias."""
    gen = torch.Generator().manual_seed(m * n)
    group_k = group or k
    a, a_s = quantize_groups(torch.randn(m, k, generator=gen), group_k)
    b, b_s = quantize_groups(torch.randn(n, k, generator=gen) * 0.05, group_k)
    bias = torch.randn(n, generator=gen).to(out_dtype)
    out = fp8_gemm(a, a_s, b, b_s, group_k, out_dtype, bias)
    ref = fp8_gemm_ref(a, a_s, b, b_s, group_k, out_dtype, bias)
    assert out.dtype == out_dtype and rel_err(out, ref) <= (1e-6 if out_dtype == torch.float32 else 1e-2)


def test_fp8_gemm_rejects_bad_operands() -> None:
    a, a_s = quantize_groups(torch.randn(4, 64), 64)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_gemm(a.float(), a_s, a, a_s, 64, torch.float32)
    with pytest.raises(ValueError, match="scales must be"):
        fp8_gemm(a, a_s[:, :0], a, a_s, 64, torch.float32)
    b, b_s = quantize_groups(torch.randn(4, 60), 20)
    with pytest.raises(ValueError, match="power of two"):
        fp8_gemm(b, b_s, b, b_s, 20, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "group"), [(1, 48, 320, None), (7, 80, 256, 64), (16, 33, 130, None),
                                                    (3, 20000, 64, 32)])
def test_fp8_weight_only_gemm(dtype: torch.dtype, m: int, n: int, k: int, group: int | None) -> None:
    """Decode rows against e4m3 weights: channel and block scales, K and N not multiples of a tile, the
    widest N tile (20,000 > 16,384), a bias; the activations stay unquantized."""
    gen = torch.Generator().manual_seed(m + n)
    w, w_s = quantize_groups(torch.randn(n, k, generator=gen) * 0.05, group or k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    out = fp8_weight_only_gemm(x, w, w_s, group or k, bias)
    ref = fp8_weight_only_gemm_ref(x, w, w_s, group or k, bias)
    assert out.dtype == dtype and rel_err(out, ref) <= TOL[dtype]


def test_fp8_weight_only_gemm_rejects_what_it_cannot_run() -> None:
    w, w_s = quantize_groups(torch.randn(8, 64), 64)
    with pytest.raises(ValueError, match="<= 16"):
        fp8_weight_only_gemm(torch.randn(17, 64), w, w_s, 64)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_weight_only_gemm(torch.randn(2, 64), w.float(), w_s, 64)
    wb, wb_s = quantize_groups(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match="must divide"):
        fp8_weight_only_gemm(torch.randn(2, 64), wb, wb_s, 32, config=(16, 64, 4, 2))


def test_fp8_linear_auto_takes_the_weight_only_kernel_for_decode_rows() -> None:
    """`auto`: up to 16 rows the activations are not quantized (the weight-only reference); above, they are
    (the FP8 x FP8 reference), so the two paths are told apart by which reference they equal exactly."""
    from kvpilot.engine.quant.fp8_linear import Fp8Linear

    gen = torch.Generator().manual_seed(3)
    layer = Fp8Linear(96, 40, gemm="auto")
    w, w_s = quantize_groups(torch.randn(40, 96, generator=gen) * 0.05, 96)
    layer.weight.copy_(w)
    layer.weight_scale.copy_(w_s)
    few, many = torch.randn(5, 96, generator=gen), torch.randn(40, 96, generator=gen)
    assert rel_err(layer(few), fp8_weight_only_gemm_ref(few, w, w_s, 96)) <= 1e-6
    blocked = Fp8Linear(96, 40, group=32, gemm="auto")  # block scales: the FP8 x FP8 kernel at any row count
    wb, wb_s = quantize_groups(torch.randn(40, 96, generator=gen) * 0.05, 32)
    blocked.weight.copy_(wb)
    blocked.weight_scale.copy_(wb_s)
    for x in (few, many):
        x_q, x_s = quantize_groups(x, 32)
        assert rel_err(blocked(x), fp8_gemm_ref(x_q, x_s, wb, wb_s, 32, torch.float32)) <= 1e-6


def _fp8_paged(seq_lens: list[int], hkv: int, page: int, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Random e4m3 caches with per-head scales (one head's scale 8x another's)."""
    k_cache, v_cache, table = paged_cache(seq_lens, hkv, D, page, torch.float32, gen)
    scales = (torch.linspace(0.01, 0.08, hkv), torch.linspace(0.05, 0.02, hkv))
    k8 = quantize_heads((k_cache * 2).flatten(0, 1), scales[0]).view(k_cache.shape)
    v8 = quantize_heads(v_cache.flatten(0, 1), scales[1]).view(v_cache.shape)
    return k8, v8, table, scales


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_into_fp8_cache(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    hkv, page, num_blocks = 2, 16, 4
    k, v = (torch.randn(6, hkv, D, generator=gen) * 5).to(dtype), torch.randn(6, hkv, D, generator=gen).to(dtype)
    k[0, 0, 0] = 1e4  # saturates at 448 * scale instead of overflowing to NaN
    slots = torch.tensor([0, page - 1, page, -1, 3 * page, num_blocks * page - 1])
    scales = (torch.tensor([0.02, 0.1]), torch.tensor([0.01, 0.005]))
    caches = [torch.zeros(num_blocks, page, hkv, D, dtype=FP8_DTYPE) for _ in range(4)]
    store_kvcache(k, v, caches[0], caches[1], slots, scales)
    store_kvcache_ref(k, v, caches[2], caches[3], slots, scales)
    assert torch.equal(caches[0].float(), caches[2].float())
    assert torch.equal(caches[1].float(), caches[3].float())
    assert caches[0].float()[0, 0, 0, 0] == FP8_MAX and not caches[0].float().isnan().any()


def test_fp8_cache_needs_its_scales() -> None:
    cache = torch.zeros(2, 16, 2, D, dtype=FP8_DTYPE)
    kv = torch.randn(1, 2, D)
    with pytest.raises(ValueError, match="needs k and v scales"):
        store_kvcache(kv, kv, cache, cache.clone(), torch.tensor([0]))
    with pytest.raises(ValueError, match="float32 \\[2\\]"):
        store_kvcache(kv, kv, cache, cache.clone(), torch.tensor([0]), (torch.ones(1), torch.ones(1)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("page", "heads"), [(16, (8, 2)), (32, (4, 4))])
def test_decode_over_fp8_cache(dtype: torch.dtype, page: int, heads: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(page + heads[0])
    hq, hkv = heads
    seq_lens = [1, page, page + 1, 150]
    k8, v8, table, scales = _fp8_paged(seq_lens, hkv, page, gen)
    q = torch.randn(len(seq_lens), hq, D, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = paged_decode_attention_ref(q, k8, v8, table, lens, 0.3, kv_scales=scales)
    for splits in (1, 4):
        out = paged_decode_attention(q, k8, v8, table, lens, 0.3, num_splits=splits, block_n=32, kv_scales=scales)
        assert rel_err(out, ref) <= TOL[dtype], f"num_splits={splits}"
    wrong = paged_decode_attention(q, k8, v8, table, lens, 0.3, num_splits=1, block_n=32,
                                   kv_scales=(scales[0], scales[1] * 2))
    assert rel_err(wrong, ref) > 0.5, "the V scale must reach the output"


@pytest.mark.parametrize("dtype", DTYPES)
def test_extend_over_fp8_cache(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    hq, hkv, page = 4, 2, 16
    parts = [(0, 37), (2 * page, 20), (70, 1)]
    seq_lens, q_lens = [p + n for p, n in parts], [n for _, n in parts]
    k8, v8, table, scales = _fp8_paged(seq_lens, hkv, page, gen)
    q = torch.randn(sum(q_lens), hq, D, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    ref = extend_attention_ref(q, k8, v8, cu, lens, table, max(q_lens), 0.25, kv_scales=scales)
    out = extend_attention(q, k8, v8, cu, lens, table, max(q_lens), 0.25, block_m=16, block_n=16, num_warps=4,
                           kv_scales=scales)
    assert rel_err(out, ref) <= TOL[dtype]


def test_fp8_cache_dequantizes_close_to_the_float_cache() -> None:
    """Attention over the e4m3 copy of a cache is within e4m3's rounding of attention over the original."""
    gen = torch.Generator().manual_seed(9)
    seq_lens = [40, 90]
    k_cache, v_cache, table = paged_cache(seq_lens, 2, D, 16, torch.float32, gen)
    scales = (k_cache.abs().amax((0, 1, 3)) / FP8_MAX, v_cache.abs().amax((0, 1, 3)) / FP8_MAX)
    k8 = quantize_heads(k_cache.flatten(0, 1), scales[0]).view(k_cache.shape)
    v8 = quantize_heads(v_cache.flatten(0, 1), scales[1]).view(v_cache.shape)
    q = torch.randn(2, 4, D, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    exact = paged_decode_attention_ref(q, k_cache, v_cache, table, lens, 0.2)
    assert rel_err(paged_decode_attention(q, k8, v8, table, lens, 0.2, kv_scales=scales), exact) < 0.05
