"""Kernel benchmark: check every Triton kernel against its reference, then time paged decode and prefill.

Run on a CUDA machine from the repository root: `python bench/kernels.py`. Writes bench/results/kernels.json
(and $OUT/kernels.json) with provenance, the measured ceilings, every correctness figure, every swept
configuration and the best one beside dense torch SDPA on the same shapes. Exits 1 without timing if any
kernel disagrees with its reference.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    bench_ms,
    ensure_kvpilot_importable,
    measure_bf16_matmul_tflops,
    measure_hbm_bandwidth,
    provenance,
    write_result,
)

ensure_kvpilot_importable()
from kernel_checks import run_checks  # noqa: E402
from kvpilot.kernels.extend_attention import (  # noqa: E402
    extend_attention,
    extend_attention_ref,
    varlen_causal_attention,
)
from kvpilot.kernels.paged_decode_attention import paged_decode_attention  # noqa: E402

DEVICE = "cuda"
HQ, HKV, D, PAGE = 32, 8, 128, 16
SCALE = 1 / math.sqrt(D)
TARGET_DECODE_TBPS = 2.6
TARGET_PREFILL_TFLOPS = 400.0
SWEEP_BUDGET_S = float(os.environ.get("KVPILOT_SWEEP_BUDGET_S", "240"))  # stop sweeping past this, so the JSON is
# always written inside the device limit

# (num_splits, block_n, num_warps, num_stages); run 1 (bench/README.md) swept 20 of these, all within 5%
DECODE_CONFIGS = [
    (1, 64, 4, 2), (2, 64, 4, 2), (4, 64, 4, 2), (1, 128, 4, 2), (1, 64, 4, 3), (1, 32, 2, 4),
    (2, 32, 2, 4), (1, 64, 8, 2), (2, 128, 8, 3), (2, 64, 4, 3),
]  # fmt: skip
# (block_m, block_n, num_warps, num_stages); the six fastest of run 1's twelve first
PREFILL_CONFIGS = [
    (128, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 4), (64, 64, 4, 4), (128, 64, 4, 3),
    (128, 64, 8, 3), (128, 32, 8, 4), (64, 128, 4, 3), (128, 128, 16, 3),
]  # fmt: skip


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _paged_from_dense(k: torch.Tensor, v: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Scatter dense [B, L, Hkv, D] K/V into a block-16 cache through a shuffled block table."""
    b, length = k.shape[:2]
    per_seq = length // PAGE
    table = torch.randperm(b * per_seq, generator=gen, device="cpu").view(b, per_seq).to(torch.int32).to(DEVICE)
    k_cache = torch.empty(b * per_seq, PAGE, HKV, D, dtype=k.dtype, device=DEVICE)
    v_cache = torch.empty_like(k_cache)
    pos = torch.arange(length, device=DEVICE)
    slots = (table[:, pos // PAGE].long() * PAGE + pos % PAGE).flatten()
    k_cache.view(-1, HKV, D)[slots] = k.flatten(0, 1)
    v_cache.view(-1, HKV, D)[slots] = v.flatten(0, 1)
    return k_cache, v_cache, table


def _sdpa_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> dict[str, Any]:
    """Dense SDPA with GQA: torch's default dispatch plus each fused backend that accepts the shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=SCALE, enable_gqa=True)

    variants: dict[str, Any] = {"default": run}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):

        def forced(backend: Any = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return run()

        try:
            forced()
            variants[name] = forced
        except Exception:  # the backend rejects this shape or device; the others still run
            continue
    return variants


def _time_sdpa(variants: dict[str, Any], work: float, unit: float) -> dict[str, Any]:
    """Median ms and rate (work / unit per second) of each SDPA variant; 'best' names the fastest."""
    timed = {name: bench_ms(fn) for name, fn in variants.items()}
    best = min(timed, key=timed.__getitem__)
    rates = {name: work * 1e3 / ms / unit for name, ms in timed.items()}
    return {"ms": timed, "rate": rates, "best": best, "best_ms": timed[best], "best_rate": rates[best]}


def _sweep(name: str, configs: list, call: Any, ref: torch.Tensor, deadline: float) -> list[dict[str, Any]]:
    rows = []
    for cfg in configs:
        if time.monotonic() > deadline:
            rows.append({"config": cfg, "skipped": "sweep time budget spent"})
            continue
        try:
            out = call(cfg)
            err = _rel(out, ref)
            ms = bench_ms(lambda cfg=cfg: call(cfg)) if err <= 1e-2 else None
            rows.append({"config": cfg, "rel_err_vs_sdpa": err, "ms": ms})
            print(f"  {name} {cfg}: err {err:.2e} {'' if ms is None else f'{ms:.4f} ms'}", flush=True)
        except Exception as exc:  # a config the compiler or the device rejects (e.g. too much shared memory)
            rows.append({"config": cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            print(f"  {name} {cfg}: {type(exc).__name__}", flush=True)
    return rows


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    timed = [r for r in rows if r.get("ms")]
    return min(timed, key=lambda r: r["ms"]) if timed else None


def bench_decode(batch: int, length: int, ceilings: dict[str, float], deadline: float) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(batch + length)
    k = torch.randn(batch, length, HKV, D, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, HQ, D, device=DEVICE, dtype=torch.bfloat16)
    k_cache, v_cache, table = _paged_from_dense(k, v, gen)
    lens = torch.full((batch,), length, dtype=torch.int32, device=DEVICE)
    kd, vd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    del k, v
    variants = _sdpa_variants(q[:, :, None], kd, vd, causal=False)
    ref = variants["default"]()[:, :, 0]

    def call(cfg: tuple[int, int, int, int]) -> torch.Tensor:
        s, bn, w, st = cfg
        return paged_decode_attention(
            q, k_cache, v_cache, table, lens, SCALE, num_splits=s, block_n=bn, num_warps=w, num_stages=st
        )

    rows = _sweep("decode", DECODE_CONFIGS, call, ref, deadline)
    default_ms = bench_ms(lambda: paged_decode_attention(q, k_cache, v_cache, table, lens, SCALE, max_seq_len=length))
    kv_bytes = 2 * batch * length * HKV * D * 2
    nbytes = kv_bytes + 2 * q.numel() * 2 + table.numel() * 4
    best = _best(rows)
    sdpa = _time_sdpa(variants, nbytes, 1e12)
    floor_ms = nbytes / (ceilings["copy_tbps"] * 1e9)
    result: dict[str, Any] = {
        "shape": {"batch": batch, "context": length, "q_heads": HQ, "kv_heads": HKV, "head_dim": D, "block_size": PAGE},
        "dtype": "bfloat16",
        "bytes": nbytes,
        "floor_ms_at_copy_bandwidth": floor_ms,
        "sdpa_dense_tbps": sdpa,
        "default_config_ms": default_ms,
        "default_config_tbps": nbytes / default_ms / 1e9,
        "sweep": rows,
        "target_tbps": TARGET_DECODE_TBPS,
    }
    if best:
        tbps = nbytes / best["ms"] / 1e9
        result["best"] = {
            "config": dict(zip(("num_splits", "block_n", "num_warps", "num_stages"), best["config"], strict=True)),
            "ms": best["ms"],
            "tbps": tbps,
            "fraction_of_copy_bandwidth": tbps / ceilings["copy_tbps"],
            "fraction_of_read_bandwidth": tbps / ceilings["read_tbps"],
            "vs_best_sdpa": sdpa["best_ms"] / best["ms"],
            "target_met": tbps >= TARGET_DECODE_TBPS,
        }
    return result


def bench_prefill(
    batch: int, length: int, prefix: int, ceilings: dict[str, float], deadline: float, configs: list
) -> dict[str, Any]:
    """Causal attention of `length - prefix` new tokens per sequence over a paged context of `length`."""
    gen = torch.Generator().manual_seed(batch * length + prefix)
    new = length - prefix
    k = torch.randn(batch, length, HKV, D, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, new, HQ, D, device=DEVICE, dtype=torch.bfloat16)
    k_cache, v_cache, table = _paged_from_dense(k, v, gen)
    cu = torch.arange(0, (batch + 1) * new, new, dtype=torch.int32, device=DEVICE)
    lens = torch.full((batch,), length, dtype=torch.int32, device=DEVICE)
    q_flat = q.flatten(0, 1)
    qd, kd, vd = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    # SDPA's causal mask is top-left aligned, so it serves as the reference only for full prefill (prefix 0).
    variants = _sdpa_variants(qd, kd, vd, causal=True) if prefix == 0 else {}
    if prefix == 0:
        ref = variants["default"]().transpose(1, 2).flatten(0, 1)
    else:
        ref = extend_attention_ref(q_flat, k_cache, v_cache, cu, lens, table, new, SCALE)

    def call(cfg: tuple[int, int, int, int]) -> torch.Tensor:
        bm, bn, w, st = cfg
        return extend_attention(
            q_flat, k_cache, v_cache, cu, lens, table, new, SCALE, block_m=bm, block_n=bn, num_warps=w, num_stages=st
        )

    rows = _sweep(f"prefill L{length} prefix{prefix}", configs, call, ref, deadline)
    # causal pairs: each new query sees the prefix plus the new keys up to itself (the usual L^2/2 for prefill)
    pairs = batch * (new * prefix + new * new / 2)
    flops = 4 * HQ * D * pairs
    best = _best(rows)
    result: dict[str, Any] = {
        "shape": {
            "batch": batch, "context": length, "cached_prefix": prefix, "new_tokens": new,
            "q_heads": HQ, "kv_heads": HKV, "head_dim": D, "block_size": PAGE,
        },
        "dtype": "bfloat16",
        "flops": flops,
        "floor_ms_at_matmul_peak": flops / (ceilings["bf16_matmul_tflops"] * 1e9),
        "sweep": rows,
        "target_tflops": TARGET_PREFILL_TFLOPS,
    }  # fmt: skip
    sdpa = _time_sdpa(variants, flops, 1e12) if variants else None
    if sdpa:
        result["sdpa_dense_tflops"] = sdpa
    if best:
        tflops = flops / best["ms"] / 1e9
        result["best"] = {
            "config": dict(zip(("block_m", "block_n", "num_warps", "num_stages"), best["config"], strict=True)),
            "ms": best["ms"],
            "tflops": tflops,
            "fraction_of_matmul_peak": tflops / ceilings["bf16_matmul_tflops"],
            "target_met": tflops >= TARGET_PREFILL_TFLOPS,
        }
        if sdpa:
            result["best"]["vs_best_sdpa"] = sdpa["best_ms"] / best["ms"]
            bm, bn, w, st = best["config"]
            k_flat, v_flat = k.flatten(0, 1), v.flatten(0, 1)
            tiles = {"block_m": bm, "block_n": bn, "num_warps": w, "num_stages": st}
            dense_ms = bench_ms(lambda: varlen_causal_attention(q_flat, k_flat, v_flat, cu, new, SCALE, **tiles))
            result["same_kernel_dense_kv"] = {"ms": dense_ms, "tflops": flops / dense_ms / 1e9}
    return result


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    started = time.monotonic()
    payload: dict[str, Any] = {"benchmark": "kernels", **provenance()}
    print(payload, flush=True)
    checks = run_checks()
    payload["correctness"] = checks
    failed = [c for c in checks if not c["ok"]]
    for c in checks:
        print(f"check {c['kernel']:<28} {c['case']:<40} rel_err {c['rel_err']:.2e} {'ok' if c['ok'] else 'FAIL'}")
    if failed:
        payload["aborted"] = f"{len(failed)} correctness checks failed; nothing timed"
        write_result("kernels", payload)
        print(payload["aborted"], file=sys.stderr)
        return 1
    ceilings = {**measure_hbm_bandwidth(), "bf16_matmul_tflops": measure_bf16_matmul_tflops()}
    payload["ceilings"] = ceilings
    print("ceilings", ceilings, flush=True)
    deadline = started + SWEEP_BUDGET_S
    payload["decode"] = bench_decode(64, 4096, ceilings, deadline)
    write_result("kernels", payload)
    payload["prefill"] = [bench_prefill(4, 4096, 0, ceilings, deadline, PREFILL_CONFIGS)]
    best4k = payload["prefill"][0].get("best")
    top = [tuple(best4k["config"].values())] if best4k else PREFILL_CONFIGS[:1]
    short = PREFILL_CONFIGS[:6]
    payload["prefill"].append(bench_prefill(16, 1024, 0, ceilings, deadline + 60, short))
    payload["prefill"].append(bench_prefill(4, 4096, 3072, ceilings, deadline + 90, top))
    payload["elapsed_s"] = time.monotonic() - started
    paths = write_result("kernels", payload)
    _summary(payload)
    print("wrote", *paths)
    return 0


def _rates(sdpa: dict[str, Any]) -> str:
    return ", ".join(f"{name} {rate:.2f}" for name, rate in sdpa["rate"].items())


def _summary(payload: dict[str, Any]) -> None:
    c = payload["ceilings"]
    print(f"\nceilings: copy {c['copy_tbps']:.2f} TB/s, read {c['read_tbps']:.2f} TB/s, "
          f"bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s")  # fmt: skip
    d = payload["decode"]
    if "best" in d:
        b = d["best"]
        print(f"decode B64 L4096: {b['tbps']:.2f} TB/s ({b['ms']:.3f} ms, {b['config']}), "
              f"SDPA {_rates(d['sdpa_dense_tbps'])} TB/s, floor {d['floor_ms_at_copy_bandwidth']:.3f} ms, "
              f"default cfg {d['default_config_tbps']:.2f} TB/s, target {TARGET_DECODE_TBPS}")  # fmt: skip
    for p in payload["prefill"]:
        if "best" in p:
            b, s = p["best"], p["shape"]
            sd = _rates(p["sdpa_dense_tflops"]) if "sdpa_dense_tflops" in p else None
            print(f"prefill B{s['batch']} L{s['context']} prefix{s['cached_prefix']}: {b['tflops']:.0f} TFLOP/s "
                  f"({b['ms']:.3f} ms, {b['config']}), SDPA {sd}, "
                  f"dense-KV same kernel {p.get('same_kernel_dense_kv', {}).get('tflops')}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
