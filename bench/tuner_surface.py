"""Record the tuner's response surface on a GPU: a grid of engine configurations -> goodput, TTFT p95, ITL p95.

Every grid point is one tuner trial exactly as `kvpilot tune` runs it (kvpilot.tuner.local.LocalRunner):
a fresh `kvpilot serve` (Llama-3.1-8B shape, dummy weights, bf16), the per-trial rate search with the
load generator, latencies from the server's own histograms. When the grid is complete it is written as
a Surface and replayed (Optuna vs grid vs random over 20 seeds), including the tuned-over-default ratio.

Result names carry the device they were measured on: a tag derived from the CUDA device name (`h200` for
"NVIDIA H200", `h100` for "NVIDIA H100 80GB HBM3", `cpu` without CUDA), or `--device-tag`.

A point takes a minute or more (server start, the load steps, the confirm step), so the run is resumable:
each finished point is appended to bench/results/tuner-surface-TAG[-GRID].partial.json (and $OUT), and
`--resume` skips what is there (a partial recorded with other load settings or on another device is refused).
The trial servers run as `python -m kvpilot serve`, so the checkout must be pip-installed (`pip install
-e . --no-deps`). From the repo root: `python -m bench.tuner_surface [--grid smoke|small|medium|full]
[--resume PARTIAL.json] [--time-budget-s 540]`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, device_info, ensure_kvpilot_importable, provenance, write_result
from bench.engine_common import SHAPES

GRIDS: dict[str, dict[str, list[float | int]]] = {
    # 2 points: a smoke test of the recorder itself (e.g. `--model demo` on CPU)
    "smoke": {"gpu_memory_utilization": [0.90], "max_num_seqs": [8, 256], "max_num_batched_tokens": [8192]},
    # the default against the surface's winning change (512-token prefill chunks), with a finer rate search:
    # the first point runs cold (kernels compile inside its window), so the tuned side is the disadvantaged one
    "chunk": {"gpu_memory_utilization": [0.90], "max_num_seqs": [256], "max_num_batched_tokens": [512, 8192]},
    # 2 x 3 x 3 = 18 points, about 20 minutes: fits one session's device budget; holds the default (0.90, 256, 8192)
    "small": {
        "gpu_memory_utilization": [0.90, 0.95],
        "max_num_seqs": [64, 256, 1024],
        "max_num_batched_tokens": [512, 2048, 8192],
    },
    # 3 x 4 x 4 = 48 points, about an hour
    "medium": {
        "gpu_memory_utilization": [0.80, 0.90, 0.95],
        "max_num_seqs": [32, 128, 256, 512],
        "max_num_batched_tokens": [512, 2048, 8192, 16384],
    },
    "full": {
        "gpu_memory_utilization": [0.70, 0.80, 0.90, 0.95],
        "max_num_seqs": [16, 64, 128, 256, 512, 1024],
        "max_num_batched_tokens": [256, 1024, 2048, 4096, 8192, 32768],
    },
}
DEFAULT = {"gpu_memory_utilization": 0.90, "max_num_seqs": 256, "max_num_batched_tokens": 8192}


def device_tag(name: str) -> str:
    """A short slug of a device name: "NVIDIA H200" -> h200, "NVIDIA A100-SXM4-80GB" -> a100, "cpu" -> cpu."""
    words = [w for w in re.split(r"[\s_]+", name) if w and w.lower() not in ("nvidia", "tesla", "geforce", "amd")]
    model = next((w for w in words if any(c.isdigit() for c in w)), words[0] if words else "unknown")
    return re.sub(r"[^a-z0-9]+", "", model.split("-")[0].lower()) or "unknown"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--grid", choices=sorted(GRIDS), default="small")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    p.add_argument("--model", help="serve this instead of the shape with dummy weights ('demo': CPU smoke test)")
    p.add_argument("--slo-ttft-p95-ms", type=float, default=500.0)
    p.add_argument("--slo-itl-p95-ms", type=float, default=50.0)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--step-seconds", type=float, default=6.0)
    p.add_argument("--rate-steps", type=int, default=3)
    p.add_argument("--start-rate", type=float, default=4.0)
    p.add_argument("--confirm-seconds", type=float, help="the confirm step at the best rate (default: 2 x step)")
    p.add_argument("--device-tag", help="names the results (default: derived from the CUDA device name)")
    p.add_argument("--resume", type=Path, help="a partial file from an earlier run: its points are not re-measured")
    p.add_argument("--time-budget-s", type=float, default=540.0, help="stop starting points after this long")
    p.add_argument("--port", type=int, default=8765)
    return p.parse_args()


def _ensure_tuner_importable() -> None:
    """bench.common maps kvpilot, engine and kernels for a bare checkout; the tuner lives in tuner/."""
    import importlib.util
    import sys

    try:
        importlib.import_module("kvpilot.tuner")
    except ImportError:
        path = Path(__file__).resolve().parents[1] / "tuner"
        spec = importlib.util.spec_from_file_location("kvpilot.tuner", path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load kvpilot.tuner from {path}") from None
        module = importlib.util.module_from_spec(spec)
        sys.modules["kvpilot.tuner"] = module
        spec.loader.exec_module(module)


def main() -> int:
    args = _args()
    ensure_kvpilot_importable()
    _ensure_tuner_importable()
    from kvpilot.engine.server.workloads import RandomWorkload
    from kvpilot.tuner.local import LocalRunner, LocalSettings
    from kvpilot.tuner.objective import SLO, RateSearchSettings
    from kvpilot.tuner.replay import replay
    from kvpilot.tuner.space import gpu_space
    from kvpilot.tuner.study import StudyState, TunerStudy
    from kvpilot.tuner.surface import Surface, SurfacePoint

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    grid = GRIDS[args.grid]
    slo = SLO(ttft_p95_ms=args.slo_ttft_p95_ms, itl_p95_ms=args.slo_itl_p95_ms)
    device = device_info()["name"]
    tag = args.device_tag or device_tag(device)
    suffix = "" if args.grid == "small" else f"-{args.grid}"
    name = f"tuner-surface-{tag}{suffix}"
    partial_path = RESULTS / f"{name}.partial.json"
    workdir = Path(os.environ.get("OUT", "/tmp")) / "tuner-surface-logs"
    workdir.mkdir(parents=True, exist_ok=True)
    max_len = args.input_len + args.output_len
    settings = LocalSettings(
        model=args.model or str(SHAPES[args.shape]), slo=slo,
        workload=RandomWorkload(min_input_len=args.input_len, max_input_len=args.input_len,
                                min_output_len=args.output_len, max_output_len=args.output_len),
        rate=RateSearchSettings(start_rate=args.start_rate, steps=args.rate_steps, max_rate=256),
        step_seconds=args.step_seconds, confirm_seconds=args.confirm_seconds or 2 * args.step_seconds,
        warmup_s=2.0, engine_port=args.port, launcher="subprocess",
        serve_args=[*([] if args.model else ["--load-format", "dummy", "--dtype", "bfloat16"]),
                    "--max-model-len", str(max_len)],
        ready_timeout_s=600, workdir=workdir,
        vocab_size=None if args.model else json.loads((SHAPES[args.shape] / "config.json").read_text())["vocab_size"])
    measured_with = {"model": args.model or args.shape, "device": device, **settings.measured_with()}
    done: dict[str, Any] = (json.loads(args.resume.read_text()) if args.resume
                            else {"grid": grid, "measured_with": measured_with, "points": []})
    if done["grid"] != grid:
        raise SystemExit(f"{args.resume} was recorded on another grid: {done['grid']}")
    if done.get("measured_with") != measured_with:  # its points would not be comparable with new ones
        raise SystemExit(f"{args.resume} was measured with other settings: {done.get('measured_with')}")
    seen = {json.dumps(p["params"], sort_keys=True) for p in done["points"]}
    runner = LocalRunner(settings, TunerStudy(StudyState(space=gpu_space())), prometheus_url=None)
    started = time.monotonic()
    for number, combo in enumerate(itertools.product(*grid.values())):
        params = dict(zip(grid, combo, strict=True))
        if json.dumps(params, sort_keys=True) in seen:
            continue
        if time.monotonic() - started > args.time_budget_s:
            logging.info("time budget spent: resume with --resume %s", partial_path)
            break
        t0 = time.monotonic()
        runner.best_rate = None  # every point starts its rate search from the same rate: points stay comparable
        o = runner.run_trial(params, number)
        point = SurfacePoint(params=params, status=o.status, goodput_per_gpu=o.goodput_per_gpu,
                             ttft_p95_ms=None if o.ttft_p95_s is None else o.ttft_p95_s * 1000,
                             itl_p95_ms=None if o.itl_p95_s is None else o.itl_p95_s * 1000,
                             note=o.reason.splitlines()[0] if o.reason else "")
        done["points"].append({**point.model_dump(), "seconds": round(time.monotonic() - t0, 1),
                               "steps": [m.model_dump() for m in o.steps]})
        logging.info("%s: %s %.0f tok/s (%.0f s)", params, o.status, o.goodput_per_gpu, time.monotonic() - t0)
        write_result(f"{name}.partial", {**done, "provenance": provenance(), "slo": slo.model_dump()})
    total = 1
    for values in grid.values():
        total *= len(values)
    if len(done["points"]) < total:
        logging.info("%d of %d points recorded; run again with --resume", len(done["points"]), total)
        return 0
    surface = Surface(
        description=f"measured on {device}: {args.model or args.shape + ' (dummy weights, bf16)'}, "
                    f"{args.input_len}-in/{args.output_len}-out, grid {args.grid}; rate search from "
                    f"{args.start_rate:g} req/s, {args.rate_steps} steps of {args.step_seconds:g} s, "
                    f"confirm {settings.confirm_seconds:g} s",
        source="measured", grid=grid, slo=slo.model_dump(exclude={"min_throughput_tokens_per_second"}),
        points=[SurfacePoint.model_validate({k: v for k, v in p.items() if k not in ("seconds", "steps")})
                for p in done["points"]],
        default_params=DEFAULT)
    write_result(name, {**surface.model_dump(), "provenance": provenance()})
    report = replay(surface, seeds=20)
    write_result(f"tuner-replay-{tag}{suffix}", {**report.model_dump(), "provenance": provenance()})
    print(report.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
