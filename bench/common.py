"""Helpers shared by the bench scripts: provenance, measured device ceilings, and the JSON result writer.

Every benchmark reports its physical floor against ceilings measured on the same device in the same run
(a device-to-device copy for bandwidth, a large bf16 matmul for the tensor-core peak), not datasheet figures.
"""

from __future__ import annotations

import datetime as dt
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# pyproject maps these folders to kvpilot.* subpackages; used when the repo is not pip-installed.
_PACKAGE_DIRS = {"kvpilot": "kvpilot", "kvpilot.engine": "engine", "kvpilot.kernels": "kernels"}


def ensure_kvpilot_importable() -> None:
    """Make `import kvpilot.kernels` work from a bare checkout (e.g. a GPU box without `pip install -e .`)."""
    try:
        importlib.import_module("kvpilot.kernels")
        return
    except ImportError:
        pass
    for name, folder in _PACKAGE_DIRS.items():
        path = REPO / folder
        spec = importlib.util.spec_from_file_location(
            name, path / "__init__.py", submodule_search_locations=[str(path)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {name} from {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def git_commit() -> dict[str, Any]:
    """HEAD and whether the working tree differs from it (benchmarks often run on uncommitted code).

    KVPILOT_COMMIT names it where the tree travelled without its .git (the GPU machine).
    """
    if os.environ.get("KVPILOT_COMMIT"):
        return {"commit": os.environ["KVPILOT_COMMIT"], "dirty": None}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        ).stdout
        return {"commit": head, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
    }


def device_info() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"name": "cpu", "cuda": False}
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
    }


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def bench_ms(fn: Any, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() over CUDA events (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def graph_ms(fn: Any, calls: int = 20, reps: int = 20) -> float:
    """Median milliseconds per fn() replayed inside one CUDA graph of `calls` calls: the GPU's time alone,
    as the engine's captured steps see it (bench_ms also counts each launch's host time, which dominates a
    decode-sized matmul)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return float(sorted(times)[len(times) // 2])


def measure_hbm_bandwidth(gib: float = 2.0) -> dict[str, float]:
    """TB/s of a device-to-device copy (bytes read + written) and of a read-only reduction over the same bytes."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src))
    # torch's reductions differ in how close they get to the read peak: keep the faster of two.
    read_ms = min(
        bench_ms(lambda: torch.amax(src.view(torch.int32))),
        bench_ms(lambda: torch.sum(src.view(torch.float32))),
    )
    nbytes = src.numel() * src.element_size()
    return {"copy_tbps": 2 * nbytes / copy_ms / 1e9, "read_tbps": nbytes / read_ms / 1e9}


def measure_bf16_matmul_tflops(n: int = 8192) -> float:
    """Dense bf16 matmul rate on random data (zeros run faster and would overstate the peak)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def provenance() -> dict[str, Any]:
    return {"device": device_info(), **git_commit(), "date": utc_now(), "versions": versions()}


def write_result(name: str, payload: dict[str, Any]) -> list[Path]:
    """Write bench/results/<name>.json, and a copy under $OUT when the device tool sets it."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=str)
    targets = [RESULTS / f"{name}.json"]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / f"{name}.json")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return targets
