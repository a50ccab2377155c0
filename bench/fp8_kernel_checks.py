"""The FP8 kernels against their references on fresh random inputs (issue 14), part of kernel_checks' list, so
every GPU benchmark checks them before it times anything: e4m3 store, paged decode and extend over an e4m3
cache, per-token activation quantization, the Triton FP8 GEMM, torch._scaled_mm (channel and block scales),
the weight-only kernel for decode rows, and Fp8Linear's `auto` choosing between them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from kvpilot.engine.quant.fp8_linear import Fp8Linear
from kvpilot.kernels.extend_attention import extend_attention, extend_attention_ref
from kvpilot.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from kvpilot.kernels.fp8_math import FP8_DTYPE, quantize_groups, quantize_heads
from kvpilot.kernels.fp8_quant import quantize_rows, quantize_rows_ref
from kvpilot.kernels.fp8_weight_only import fp8_weight_only_gemm, fp8_weight_only_gemm_ref
from kvpilot.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from kvpilot.kernels.store_kvcache import store_kvcache, store_kvcache_ref

DEVICE = "cuda"
Case = tuple[str, str, torch.dtype, Callable[[], float]]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out.float()).all():
        return float("inf")
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _scales(hkv: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.rand(hkv, device=DEVICE) * 0.02 + 0.002, torch.rand(hkv, device=DEVICE) * 0.02 + 0.002)


def _fp8_paged(seq_lens: list[int], page: int) -> tuple[torch.Tensor, ...]:
    """kernel_checks' random paged caches (8 KV heads, d128) in e4m3, with the per-head scales to read them."""
    from kernel_checks import _paged  # at call time: kernel_checks imports this module for its case list

    k_cache, v_cache, table = _paged(seq_lens, 8, 128, page, torch.float32)
    scales = _scales(8)
    k = quantize_heads(k_cache.flatten(0, 1), scales[0] / 2).view(k_cache.shape)
    v = quantize_heads(v_cache.flatten(0, 1), scales[1] / 2).view(v_cache.shape)
    return k, v, table, *scales


def _store(dtype: torch.dtype) -> float:
    caches = [torch.zeros(64, 16, 8, 128, dtype=FP8_DTYPE, device=DEVICE) for _ in range(4)]
    k, v = (torch.randn(300, 8, 128, device=DEVICE).to(dtype) for _ in range(2))
    slots = torch.randperm(64 * 16, device=DEVICE)[:300]
    slots[::7] = -1
    scales = _scales(8)
    store_kvcache(k, v, caches[0], caches[1], slots, scales)
    store_kvcache_ref(k, v, caches[2], caches[3], slots, scales)
    return max(_rel(caches[0], caches[2]), _rel(caches[1], caches[3]))


def _decode(dtype: torch.dtype, splits: int | None) -> float:
    seq_lens = [1, 16, 17, 1000, 4096, 77, 3000]
    k, v, table, ks, vs = _fp8_paged(seq_lens, 16)
    q = torch.randn(len(seq_lens), 32, 128, device=DEVICE).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, k, v, table, lens, 0.088, num_splits=splits, max_seq_len=4096, kv_scales=(ks, vs))
    return _rel(out, paged_decode_attention_ref(q, k, v, table, lens, 0.088, kv_scales=(ks, vs)))


def _extend(dtype: torch.dtype) -> float:
    parts = [(0, 500), (1024, 300), (13, 19), (2000, 1), (37, 129)]
    seq_lens, q_lens = [p + n for p, n in parts], [n for _, n in parts]
    k, v, table, ks, vs = _fp8_paged(seq_lens, 16)
    q = torch.randn(sum(q_lens), 32, 128, device=DEVICE).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = extend_attention(q, k, v, cu, lens, table, max(q_lens), 0.088, kv_scales=(ks, vs))
    return _rel(out, extend_attention_ref(q, k, v, cu, lens, table, max(q_lens), 0.088, kv_scales=(ks, vs)))


def _quant(dtype: torch.dtype, group: int | None) -> float:
    x = (torch.randn(257, 4096, device=DEVICE) * 3).to(dtype)
    (q, s), (q_ref, s_ref) = quantize_rows(x, group), quantize_rows_ref(x, group)
    return max(_rel(s, s_ref), _rel(q.float(), q_ref.float()))


def _gemm(m: int, group: int | None) -> float:
    a, a_s = quantize_groups(torch.randn(m, 4096, device=DEVICE), group or 4096)
    b, b_s = quantize_groups(torch.randn(6144, 4096, device=DEVICE) * 0.02, group or 4096)
    out = fp8_gemm(a, a_s, b, b_s, group or 4096, torch.bfloat16)
    return _rel(out, fp8_gemm_ref(a, a_s, b, b_s, group or 4096, torch.bfloat16))


def _weight_only(m: int, group: int | None, n: int = 6144, k: int = 4096) -> float:
    w, w_s = quantize_groups(torch.randn(n, k, device=DEVICE) * 0.02, group or k)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    out = fp8_weight_only_gemm(x, w, w_s, group or k)
    return _rel(out, fp8_weight_only_gemm_ref(x, w, w_s, group or k))


def _linear(gemm: str, m: int) -> float:
    """Fp8Linear with `gemm` against the reference of the path it takes at m rows (auto at <= 16: weight-only)."""
    layer = Fp8Linear(4096, 6144, gemm=gemm).to(DEVICE)
    w, s = quantize_groups(torch.randn(6144, 4096, device=DEVICE) * 0.02, 4096)
    layer.weight.copy_(w)
    layer.weight_scale.copy_(s)
    x = torch.randn(m, 4096, device=DEVICE, dtype=torch.bfloat16)
    out = layer(x)
    if gemm == "auto" and m <= 16:
        return _rel(out, fp8_weight_only_gemm_ref(x, w, s, 4096))
    layer.gemm = "reference"
    return _rel(out, layer(x))


def fp8_cases() -> list[Case]:
    cases: list[Case] = []
    for dt in (torch.bfloat16, torch.float16):
        name = str(dt).removeprefix("torch.")
        cases += [
            ("store_kvcache", f"{name} -> e4m3 per-head scales", dt, lambda dt=dt: _store(dt)),
            ("paged_decode_attention", f"{name} e4m3 cache default splits", dt, lambda dt=dt: _decode(dt, None)),
            ("paged_decode_attention", f"{name} e4m3 cache 1 split", dt, lambda dt=dt: _decode(dt, 1)),
            ("extend_attention", f"{name} e4m3 cache mixed prefix+chunk", dt, lambda dt=dt: _extend(dt)),
            ("fp8_quantize_rows", f"{name} 257x4096 per token", dt, lambda dt=dt: _quant(dt, None)),
            ("fp8_quantize_rows", f"{name} 257x4096 groups of 128", dt, lambda dt=dt: _quant(dt, 128)),
        ]
    for m in (1, 48, 333):
        cases += [
            ("fp8_gemm", f"triton M{m} 6144x4096 channel", torch.bfloat16, lambda m=m: _gemm(m, None)),
            ("fp8_gemm", f"triton M{m} 6144x4096 block 128", torch.bfloat16, lambda m=m: _gemm(m, 128)),
            ("fp8_scaled_mm", f"Fp8Linear scaled_mm M{m} vs reference", torch.bfloat16,
             lambda m=m: _linear("scaled_mm", m)),
            ("fp8_linear_auto", f"Fp8Linear auto M{m} vs its path's reference", torch.bfloat16,
             lambda m=m: _linear("auto", m)),
        ]
    for m in (1, 5, 16):
        cases += [
            ("fp8_weight_only", f"M{m} 6144x4096 channel", torch.bfloat16, lambda m=m: _weight_only(m, None)),
            ("fp8_weight_only", f"M{m} 6144x4096 block 128", torch.bfloat16, lambda m=m: _weight_only(m, 128)),
            ("fp8_weight_only", f"M{m} 28672x4096 channel", torch.bfloat16,
             lambda m=m: _weight_only(m, None, 28672)),
            ("fp8_weight_only", f"M{m} 4096x14336 channel", torch.bfloat16,
             lambda m=m: _weight_only(m, None, 4096, 14336)),
        ]
    return cases
