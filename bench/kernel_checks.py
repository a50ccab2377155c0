"""Fresh-random-input checks of every Triton kernel against its PyTorch reference, run before any timing (the FP8
kernels' cases are fp8_kernel_checks.py's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fp8_kernel_checks import fp8_cases
from kvpilot.kernels.activation import silu_and_mul, silu_and_mul_ref
from kvpilot.kernels.extend_attention import (
    extend_attention,
    extend_attention_ref,
    varlen_causal_attention,
    varlen_causal_attention_ref,
)
from kvpilot.kernels.fused_moe import fused_experts, fused_experts_ref, route, route_fused
from kvpilot.kernels.fused_moe_config import get_config
from kvpilot.kernels.moe_align import align_block_size_kernel, align_block_size_ref
from kvpilot.kernels.moe_sum import sum_top_k, sum_top_k_ref
from kvpilot.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from kvpilot.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from kvpilot.kernels.rotary import build_rope_cache, rotary_embedding, rotary_embedding_ref
from kvpilot.kernels.store_kvcache import store_kvcache, store_kvcache_ref

DEVICE = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _paged(seq_lens: list[int], hkv: int, d: int, page: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    per_seq = [-(-n // page) for n in seq_lens]
    num_blocks = sum(per_seq) + 5
    k_cache = torch.randn(num_blocks, page, hkv, d, device=DEVICE).to(dtype)
    v_cache = torch.randn(num_blocks, page, hkv, d, device=DEVICE).to(dtype)
    perm = torch.randperm(num_blocks, device=DEVICE)
    table = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32, device=DEVICE)
    used = 0
    for i, n in enumerate(per_seq):
        table[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
    return k_cache, v_cache, table


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _store(dtype: torch.dtype, page: int) -> float:
    k_cache = torch.randn(64, page, 8, 128, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    k = torch.randn(300, 8, 128, device=DEVICE).to(dtype)
    v = torch.randn_like(k)
    slots = torch.randperm(64 * page, device=DEVICE)[:300]
    slots[::7] = -1
    store_kvcache(k, v, k_cache, v_cache, slots)
    store_kvcache_ref(k, v, k_ref, v_ref, slots)
    return max(_rel(k_cache, k_ref), _rel(v_cache, v_ref))


def _norm(dtype: torch.dtype) -> float:
    x = torch.randn(257, 4096, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(4096, device=DEVICE)).to(dtype)
    return _rel(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))


def _add_norm(dtype: torch.dtype) -> float:
    x, r = (torch.randn(257, 4096, device=DEVICE).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(4096, device=DEVICE)).to(dtype)
    out, res = fused_add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_res = fused_add_rms_norm_ref(x, r, w, 1e-5)
    return max(_rel(out, ref_out), _rel(res, ref_res))


def _rotary(dtype: torch.dtype) -> float:
    cos, sin = build_rope_cache(128, 8192, 500000.0, LLAMA3, device=DEVICE)
    qkv = torch.randn(333, 48 * 128, device=DEVICE).to(dtype)
    q, k = qkv[:, : 32 * 128].view(-1, 32, 128), qkv[:, 32 * 128 : 40 * 128].view(-1, 8, 128)
    q_ref, k_ref = q.clone(), k.clone()
    positions = torch.randint(0, 8192, (333,), device=DEVICE)
    rotary_embedding(positions, q, k, cos, sin)
    rotary_embedding_ref(positions, q_ref, k_ref, cos, sin)
    return max(_rel(q, q_ref), _rel(k, k_ref))


def _qk_norm_rotary(dtype: torch.dtype) -> float:
    """Qwen3's q/k head norms fused in front of the rotation (32/4 heads, d128, as Qwen3-30B-A3B)."""
    cos, sin = build_rope_cache(128, 8192, 1000000.0, device=DEVICE)
    qkv = (3 * torch.randn(77, 40 * 128, device=DEVICE)).to(dtype)
    q, k = qkv[:, : 32 * 128].view(-1, 32, 128), qkv[:, 32 * 128 : 36 * 128].view(-1, 4, 128)
    norms = ((1 + 0.2 * torch.randn(128, device=DEVICE)).to(dtype), torch.randn(128, device=DEVICE).to(dtype), 1e-6)
    q_ref, k_ref = q.clone(), k.clone()
    positions = torch.randint(0, 8192, (77,), device=DEVICE)
    rotary_embedding(positions, q, k, cos, sin, norms)
    rotary_embedding_ref(positions, q_ref, k_ref, cos, sin, norms)
    return max(_rel(q, q_ref), _rel(k, k_ref))


def _moe_sum(dtype: torch.dtype, tokens: int, top_k: int, rows_dtype: torch.dtype) -> float:
    rows = torch.randn(tokens * top_k, 2048, device=DEVICE).to(rows_dtype)
    return _rel(sum_top_k(rows, top_k, dtype), sum_top_k_ref(rows, top_k, dtype))


def _silu(dtype: torch.dtype) -> float:
    x = torch.randn(129, 2 * 14336, device=DEVICE).to(dtype)
    return _rel(silu_and_mul(x), silu_and_mul_ref(x))


def _decode(dtype: torch.dtype, page: int, splits: int | None, window: int | None = None) -> float:
    seq_lens = [1, page, page + 1, 1000, 4096, 77, 2 * page, 3000]
    k_cache, v_cache, table = _paged(seq_lens, 8, 128, page, dtype)
    q = torch.randn(len(seq_lens), 32, 128, device=DEVICE).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = paged_decode_attention(q, k_cache, v_cache, table, lens, 0.088, num_splits=splits, max_seq_len=4096,
                                 window=window)  # fmt: skip
    return _rel(out, paged_decode_attention_ref(q, k_cache, v_cache, table, lens, 0.088, window=window))


def _extend(dtype: torch.dtype, page: int, window: int | None = None) -> float:
    parts = [(0, 500), (1024, 300), (page - 3, 3 + page), (2000, 1), (0, 1), (37, 129)]
    seq_lens, q_lens = [p + n for p, n in parts], [n for _, n in parts]
    k_cache, v_cache, table = _paged(seq_lens, 8, 128, page, dtype)
    q = torch.randn(sum(q_lens), 32, 128, device=DEVICE).to(dtype)
    cu, lens = _cu(q_lens), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = extend_attention(q, k_cache, v_cache, cu, lens, table, max(q_lens), 0.088, window=window)
    ref = extend_attention_ref(q, k_cache, v_cache, cu, lens, table, max(q_lens), 0.088, window=window)
    return _rel(out, ref)


def _moe(dtype: torch.dtype, tokens: int, experts: int, top_k: int, inter: int, hidden: int,
         sort: bool = False) -> float:
    """The fused MoE kernels at a real model's expert shape (Qwen3-30B-A3B: 128 x 768 x 2048, top-8); a few
    tokens go pair by pair unless `sort` forces the sorted path (a given config does)."""
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=DEVICE) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=DEVICE) * inter**-0.5).to(dtype)
    weights, ids = route(torch.randn(tokens, experts, device=DEVICE), top_k, renormalize=True)
    cfg = get_config(tokens, experts, inter, dtype, x.device) if sort else None
    return _rel(fused_experts(x, w13, w2, weights, ids, cfg), fused_experts_ref(x, w13, w2, weights, ids))


def _route(tokens: int, experts: int, top_k: int, renormalize: bool) -> float:
    """0.0 if the one-launch router picks route()'s experts (fp32 logits: no ties) with its weights, else 1.0."""
    logits = torch.randn(tokens, experts, device=DEVICE)
    (weights, ids), (want_w, want_ids) = route_fused(logits, top_k, renormalize), route(logits, top_k, renormalize)
    return 0.0 if torch.equal(ids.long(), want_ids) and torch.allclose(weights, want_w, 1e-5, 1e-6) else 1.0


def _align(tokens: int, experts: int, top_k: int, block_m: int) -> float:
    """0.0 if the sort kernel equals the torch sort bit for bit, else 1.0 (it moves ids, no arithmetic); the
    kernel is run at every count, also above the one where the engine hands long prefills to the torch ops."""
    ids = torch.rand(tokens, experts, device=DEVICE).argsort(dim=1)[:, :top_k].to(torch.int32)
    got, want = align_block_size_kernel(ids, block_m, experts), align_block_size_ref(ids, block_m, experts)
    return 0.0 if all(torch.equal(g, w) for g, w in zip(got, want, strict=True)) else 1.0


def _varlen(dtype: torch.dtype) -> float:
    q_lens = [1, 300, 129, 64]
    q = torch.randn(sum(q_lens), 32, 128, device=DEVICE).to(dtype)
    k, v = (torch.randn(sum(q_lens), 8, 128, device=DEVICE).to(dtype) for _ in range(2))
    cu = _cu(q_lens)
    out = varlen_causal_attention(q, k, v, cu, max(q_lens), 0.088)
    return _rel(out, varlen_causal_attention_ref(q, k, v, cu, max(q_lens), 0.088))


def _cases() -> list[tuple[str, str, torch.dtype, Callable[[], float]]]:
    cases: list[tuple[str, str, torch.dtype, Callable[[], float]]] = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        name = str(dt).removeprefix("torch.")
        cases += [
            ("store_kvcache", f"{name} block16", dt, lambda dt=dt: _store(dt, 16)),
            ("store_kvcache", f"{name} block32", dt, lambda dt=dt: _store(dt, 32)),
            ("rms_norm", f"{name} 257x4096", dt, lambda dt=dt: _norm(dt)),
            ("fused_add_rms_norm", f"{name} 257x4096", dt, lambda dt=dt: _add_norm(dt)),
            ("rotary_embedding", f"{name} llama3 T333 32/8 d128", dt, lambda dt=dt: _rotary(dt)),
            ("rotary_embedding", f"{name} qk norms T77 32/4 d128", dt, lambda dt=dt: _qk_norm_rotary(dt)),
            ("moe_sum", f"{name} T1 top8 fp32 rows", dt, lambda dt=dt: _moe_sum(dt, 1, 8, torch.float32)),
            ("moe_sum", f"{name} T333 top8", dt, lambda dt=dt: _moe_sum(dt, 333, 8, dt)),
            ("silu_and_mul", f"{name} 129x(2x14336)", dt, lambda dt=dt: _silu(dt)),
            ("paged_decode_attention", f"{name} block16 default splits", dt, lambda dt=dt: _decode(dt, 16, None)),
            ("paged_decode_attention", f"{name} block32 1 split", dt, lambda dt=dt: _decode(dt, 32, 1)),
            ("paged_decode_attention", f"{name} block16 8 splits", dt, lambda dt=dt: _decode(dt, 16, 8)),
            ("extend_attention", f"{name} block16 mixed prefix+chunk", dt, lambda dt=dt: _extend(dt, 16)),
            ("extend_attention", f"{name} block32 mixed prefix+chunk", dt, lambda dt=dt: _extend(dt, 32)),
            ("varlen_causal_attention", f"{name} no cache", dt, lambda dt=dt: _varlen(dt)),
            ("paged_decode_attention", f"{name} block16 window 1000", dt, lambda dt=dt: _decode(dt, 16, None, 1000)),
            ("extend_attention", f"{name} block16 window 700", dt, lambda dt=dt: _extend(dt, 16, 700)),
        ]
        for tokens in (1, 5, 8, 64, 333):  # 1-8: the few-token path
            cases.append(("fused_moe", f"{name} E128 top8 I768 H2048 T{tokens}", dt,
                          lambda dt=dt, t=tokens: _moe(dt, t, 128, 8, 768, 2048)))  # fmt: skip
        cases.append(("fused_moe", f"{name} E128 top8 I768 H2048 T1 sorted", dt,
                      lambda dt=dt: _moe(dt, 1, 128, 8, 768, 2048, sort=True)))  # fmt: skip
        for tokens in (1, 200):
            cases.append(("fused_moe", f"{name} E8 top2 I1792 H4096 T{tokens}", dt,
                          lambda dt=dt, t=tokens: _moe(dt, t, 8, 2, 1792, 4096)))  # fmt: skip
    for tokens, experts, top_k, renorm in ((1, 128, 8, True), (4096, 128, 8, True), (77, 8, 2, True),
                                           (9, 60, 4, False)):
        cases.append(("moe_route", f"E{experts} top{top_k} T{tokens}", torch.float32,
                      lambda t=tokens, e=experts, k=top_k, r=renorm: _route(t, e, k, r)))  # fmt: skip
    for tokens, experts, top_k, block_m in ((1, 128, 8, 16), (64, 128, 8, 16), (333, 128, 8, 64), (512, 128, 8, 16),
                                            (4096, 128, 8, 64), (3, 8, 2, 64), (1000, 8, 2, 32)):
        cases.append(("moe_align", f"E{experts} top{top_k} T{tokens} block{block_m}", torch.float32,
                      lambda t=tokens, e=experts, k=top_k, b=block_m: _align(t, e, k, b)))  # fmt: skip
    return cases + fp8_cases()


def run_checks(keep: Callable[[str, str], bool] | None = None) -> list[dict[str, Any]]:
    """Every case (or those `keep(kernel, case)` selects) on fresh random inputs."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
    results = []
    for kernel, case, dtype, fn in _cases():
        if keep is not None and not keep(kernel, case):
            continue
        try:
            err = fn()
            results.append({"kernel": kernel, "case": case, "rel_err": err, "ok": err <= TOL[dtype]})
        except Exception as exc:  # report the failure and keep checking the other kernels
            results.append({"kernel": kernel, "case": case, "rel_err": float("inf"), "ok": False, "error": repr(exc)})
    return results


# ---- command line: what follows does not change what is checked


FAMILIES = ("core", "moe", "fp8")


def family_of(kernel: str, case: str) -> str:
    """Which timings a failed check must stop: fp8, moe, or core (everything else)."""
    if "fp8" in kernel or "e4m3" in case:
        return "fp8"
    return "moe" if kernel in ("fused_moe", "moe_align", "moe_route", "moe_sum") else "core"


def family_sha256(family: str) -> str:
    """A hash of what a family's verdict stands for: the cases and their helpers (this file above run_checks),
    and the kernels: every one but the FP8 ones for core and moe; for fp8 all of them, the FP8 layer and the
    FP8 cases. A recorded pass is reused only for the very same code. The tile tables in fused_moe_configs/
    are left out: they choose among tiles, each of which the tune that wrote the table checked against the
    reference on the GPU before timing it, so committing a table does not send a device call through every
    check again (it did once: the checks outran the call)."""
    import hashlib
    from pathlib import Path

    here = Path(__file__).resolve().parent
    root = here.parent
    files = [f for f in sorted((root / "kernels").rglob("*"))
             if f.is_file() and "__pycache__" not in f.parts and "fused_moe_configs" not in f.parts]
    if family == "fp8":
        files += [root / "engine" / "quant" / "fp8_linear.py", here / "fp8_kernel_checks.py"]
    else:
        files = [f for f in files if not f.name.startswith("fp8_")]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    digest.update(Path(__file__).read_text().split("\ndef run_checks(")[0].encode())
    return digest.hexdigest()


def main() -> int:
    """Every check, written to bench/results/kernel-checks.json. `--ok-dir D` touches D/<family> for each family
    whose checks all passed, so a device script times only what was verified; exit 1 if any check fails."""
    import argparse
    import json
    from pathlib import Path

    from common import provenance, write_result

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ok-dir", type=Path)
    parser.add_argument("--reuse", type=Path, help="a recorded run: each family whose code is unchanged since it "
                        "(family_sha256) and that ran on this kind of device is taken from it, not checked again")
    args = parser.parse_args()
    recorded = json.loads(args.reuse.read_text()) if args.reuse and args.reuse.is_file() else {}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    hashes = {fam: family_sha256(fam) for fam in FAMILIES}
    reused = [fam for fam in FAMILIES if recorded.get("device", {}).get("name") == device
              and recorded.get("family_sha256", {}).get(fam) == hashes[fam]]
    checks = [c for c in recorded.get("checks", []) if c["family"] in reused]
    if reused:
        print(f"reusing {', '.join(reused)} from {args.reuse} (commit {recorded['commit']}, {recorded['date']})")
    if len(reused) < len(FAMILIES):
        fresh = [{**c, "family": family_of(c["kernel"], c["case"])}
                 for c in run_checks(lambda kernel, case: family_of(kernel, case) not in reused)]
        checks += fresh
        write_result("kernel-checks", {**provenance(), "family_sha256": hashes, "reused": reused,
                                       "reused_from": recorded.get("commit"), "passed": sum(c["ok"] for c in checks),
                                       "failed": sum(not c["ok"] for c in checks), "checks": checks})
    failed = [c for c in checks if not c["ok"]]
    for c in checks:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['kernel']:<28} {c['case']:<44} {c['rel_err']:.2e}",
              c.get("error", ""))
    for fam in sorted({c["family"] for c in checks}):
        ok = all(c["ok"] for c in checks if c["family"] == fam)
        print(f"family {fam}: {'passed' if ok else 'FAILED'}")
        if ok and args.ok_dir:
            args.ok_dir.mkdir(parents=True, exist_ok=True)
            (args.ok_dir / fam).touch()
    print(f"{len(checks) - len(failed)}/{len(checks)} kernel checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
