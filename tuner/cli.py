"""`kvpilot tune`: tune the engine's knobs against SLOs on this machine, one engine server per trial."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

log = logging.getLogger(__name__)
# EngineConfig fields `tune` sets itself: --model is its own flag, every trial has its own revision label and
# served name, and --seed seeds the study and the workload.
TUNE_OWN = ("model", "revision", "served_model_name", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory, or 'demo'")
    parser.add_argument("--output", type=Path, required=True, help="directory for best_config.json, trials, plots")
    parser.add_argument("--trials", type=int, default=8, help="configurations to measure (default: 8)")
    slo = parser.add_argument_group("SLO")
    slo.add_argument("--slo-ttft-p95-ms", type=float, required=True, help="time to first token, p95")
    slo.add_argument("--slo-itl-p95-ms", type=float, required=True, help="inter-token latency, p95")
    slo.add_argument("--min-throughput", type=float, help="the service's floor in generated tokens/s")
    w = parser.add_argument_group("workload (token-id prompts; defaults sized for the demo model)")
    w.add_argument("--workload", choices=["random", "shared-prefix"], default="random")
    w.add_argument("--input-len", type=int, nargs=2, metavar=("MIN", "MAX"), default=[32, 64])
    w.add_argument("--output-len", type=int, nargs=2, metavar=("MIN", "MAX"), default=[16, 32],
                   help="shared-prefix uses MIN")
    w.add_argument("--num-groups", type=int, default=4, help="shared-prefix: distinct prefixes")
    w.add_argument("--prefix-len", type=int, default=48, help="shared-prefix: prefix tokens")
    w.add_argument("--suffix-len", type=int, default=16, help="shared-prefix: tokens after the prefix")
    r = parser.add_argument_group("per-trial rate search")
    r.add_argument("--start-rate", type=float, default=8.0,
                   help="requests/s of the first trial's first step; later trials start at the best rate so far")
    r.add_argument("--max-rate", type=float, default=1000.0)
    r.add_argument("--rate-steps", type=int, default=2, help="search steps per trial, before the confirm step")
    r.add_argument("--step-seconds", type=float, default=2.0, help="arrival time of one load step")
    r.add_argument("--confirm-seconds", type=float, default=4.0,
                   help="arrival time of the step confirming the best rate (short steps under-read TTFT near capacity)")
    r.add_argument("--headroom", type=float, default=0.2,
                   help="a step counts only if its p95s beat the SLO by this share (default 0.2), so the tuned "
                   "configuration still meets the SLO when measured again")
    r.add_argument("--warmup-seconds", type=float, default=0.5, help="start of each step left out of the metrics")
    s = parser.add_argument_group("search")
    s.add_argument("--target", choices=["auto", "cpu", "gpu"], default="auto",
                   help="gpu tunes gpu_memory_utilization; cpu tunes num_kv_blocks (default: gpu if one is visible)")
    s.add_argument("--gpus", type=int, default=1, help="GPUs one replica may use (tensor_parallel_size divides it)")
    s.add_argument("--search", action="append", default=[], metavar="KNOB=MIN:MAX|KNOB=VALUE",
                   help="narrow a knob's bounds or pin it, e.g. max_num_seqs=4:32 or num_kv_blocks=64")
    s.add_argument("--enqueue", action="append", default=[], metavar="JSON",
                   help='run this configuration first, e.g. \'{"num_kv_blocks": 64, "max_num_seqs": 16}\'')
    s.add_argument("--allow-quantization", action="store_true",
                   help="also search quantization (fp8 weights) and kv_cache_dtype (fp8 KV cache), which trade "
                   "accuracy for speed")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", action="store_true", help="continue the study in OUTPUT/trials.json")
    from kvpilot.engine.flags import add_engine_flags

    add_engine_flags(parser.add_argument_group("engine, for every trial (a knob the study searches is set by it; "
                                               "--max-model-len defaults to the workload's longest request)"),
                     exclude=TUNE_OWN)
    e = parser.add_argument_group("trial servers and metrics")
    e.add_argument("--engine-port", type=int, help="port every trial's server listens on (default: a free one)")
    e.add_argument("--prometheus-url", help="a Prometheus that scrapes --engine-port (default: start one)")
    e.add_argument("--no-prometheus", action="store_true", help="read the engine's /metrics directly")
    e.add_argument("--launcher", choices=["forkserver", "subprocess"], default="forkserver",
                   help="forkserver: trial servers fork from a process with the imports done (fast start)")
    e.add_argument("--verify", action="store_true", help="measure the best configuration once more at the end")


def _overrides(items: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            if ":" in value:
                lo, hi = value.split(":", 1)
                out[name] = {"min": float(lo), "max": float(hi)}
            else:
                out[name] = {"fixed": float(value)}
        except ValueError:
            raise ValueError(f"--search {item!r}: expected KNOB=MIN:MAX or KNOB=VALUE") from None
    return out


def _gpu_visible() -> bool:
    return os.path.exists("/dev/nvidiactl") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


@contextlib.contextmanager
def _prometheus(args: argparse.Namespace, port: int) -> Iterator[tuple[str | None, str]]:
    if args.no_prometheus:
        yield None, "the engine's /metrics (--no-prometheus)"
        return
    if args.prometheus_url:
        yield args.prometheus_url, f"Prometheus at {args.prometheus_url} (it must scrape 127.0.0.1:{port})"
        return
    from kvpilot.tuner.prometheus import local_prometheus

    try:
        with local_prometheus(f"127.0.0.1:{port}") as url:
            yield url, f"a local Prometheus it started at {url}"
    except FileNotFoundError as exc:
        log.warning("%s: reading the engine's /metrics directly instead", exc)
        yield None, "the engine's /metrics (no prometheus binary on PATH)"


def run(args: argparse.Namespace) -> int:
    from kvpilot.engine.flags import engine_values, to_flags
    from kvpilot.engine.server.workloads import RandomWorkload, SharedPrefixWorkload
    from kvpilot.tuner.local import LocalRunner, LocalSettings
    from kvpilot.tuner.objective import SLO, RateSearchSettings
    from kvpilot.tuner.prometheus import free_port
    from kvpilot.tuner.report import load_state, summary_line, write_report
    from kvpilot.tuner.space import cpu_space, engine_flags, gpu_space
    from kvpilot.tuner.study import StudyState, TrialRecord, TunerStudy

    if args.trials < 1:
        log.error("--trials must be at least 1")
        return 2
    if args.prometheus_url and not args.engine_port:
        log.error("--prometheus-url needs --engine-port: the port that Prometheus scrapes, where every trial serves")
        return 2
    try:
        if args.workload == "random":
            workload: RandomWorkload | SharedPrefixWorkload = RandomWorkload(
                min_input_len=args.input_len[0], max_input_len=args.input_len[1],
                min_output_len=args.output_len[0], max_output_len=args.output_len[1], seed=args.seed)
            longest = args.input_len[1] + args.output_len[1]
        else:
            workload = SharedPrefixWorkload(num_groups=args.num_groups, prefix_len=args.prefix_len,
                                            suffix_len=args.suffix_len, output_len=args.output_len[0], seed=args.seed)
            longest = args.prefix_len + args.suffix_len + args.output_len[0]
        max_model_len = args.max_model_len or longest
        target = args.target if args.target != "auto" else ("gpu" if _gpu_visible() else "cpu")
        allow = args.allow_quantization
        space = (gpu_space(args.gpus, allow) if target == "gpu" else cpu_space(max_model_len, allow)).with_overrides(
            _overrides(args.search))
        fixed = {**engine_values(args, exclude=TUNE_OWN), "max_model_len": max_model_len}
        searched = sorted(k.name for k in space.knobs if k.name in fixed)
        if searched:
            raise ValueError(f"the study sets {searched} itself: pin a knob with --search KNOB=VALUE instead")
        enqueued = [json.loads(raw) for raw in args.enqueue]
        slo = SLO(ttft_p95_ms=args.slo_ttft_p95_ms, itl_p95_ms=args.slo_itl_p95_ms,
                  min_throughput_tokens_per_second=args.min_throughput)
        rate = RateSearchSettings(start_rate=args.start_rate, max_rate=args.max_rate, steps=args.rate_steps,
                                  headroom=args.headroom)
        out: Path = args.output
        out.mkdir(parents=True, exist_ok=True)
        state = load_state(out / "trials.json") if args.resume else StudyState(space=space, seed=args.seed)
        if args.resume and state.space != space:
            raise ValueError("the search space differs from the resumed study's: drop --resume or match the flags")
        port = args.engine_port or free_port()
        settings = LocalSettings(
            model=args.model, slo=slo, workload=workload, rate=rate, step_seconds=args.step_seconds,
            confirm_seconds=args.confirm_seconds,
            warmup_s=args.warmup_seconds, engine_port=port, serve_args=to_flags(fixed),
            launcher=args.launcher, gpus=args.gpus if target == "gpu" else 1, workdir=out / "logs")
        study = TunerStudy(state)
        for params in enqueued:
            study.enqueue(params)
    except (ValidationError, ValueError) as exc:
        log.error("invalid settings: %s", exc)
        return 2
    settings.workdir.mkdir(parents=True, exist_ok=True)
    for noisy in ("httpx", "matplotlib"):  # a line per request / font scan would drown the progress lines
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    print(f"kvpilot tune: {args.trials} trials of {args.model} ({target}), SLO TTFT p95 <= {slo.ttft_p95_ms} ms, "
          f"ITL p95 <= {slo.itl_p95_ms} ms", flush=True)
    print(f"  {space.note}", flush=True)
    started = time.monotonic()
    with _prometheus(args, port) as (prom_url, prom_text):
        print(f"  metrics from {prom_text}", flush=True)
        runner = LocalRunner(settings, study, prom_url)
        total = args.trials

        def progress(record: TrialRecord) -> None:
            o = record.outcome
            figures = (f"{o.goodput_per_gpu:.0f} tok/s at {o.request_rate:.2f} req/s, TTFT p95 "
                       f"{(o.ttft_p95_s or 0) * 1000:.0f} ms, ITL p95 {(o.itl_p95_s or 0) * 1000:.0f} ms"
                       if o.status == "ok" else (o.reason.splitlines() or [""])[0][:160])
            best = study.best()
            print(f"[{study.trials_run}/{total}] trial {record.number} {json.dumps(record.params)}: {o.status}: "
                  f"{figures} ({record.duration_s:.1f} s; best so far "
                  f"{best.outcome.goodput_per_gpu if best else 0:.0f} tok/s)", flush=True)
            write_report(study, out, args.model, slo, [], settings.measured_with())

        try:
            runner.run(total, progress)
        except (TimeoutError, RuntimeError) as exc:  # e.g. a given Prometheus that does not scrape the engine
            log.error("tuning stopped: %s", exc)
            write_report(study, out, args.model, slo, [], settings.measured_with())
            return 1

        best_record = study.best()
        serve_flags = [*to_flags({"model": args.model}), *settings.serve_args, *engine_flags(best_record.params)] \
            if best_record else []
        best = write_report(study, out, args.model, slo, serve_flags, settings.measured_with())
        print(summary_line(best), flush=True)
        if args.verify and best_record is not None:
            m = runner.verify(best_record)
            verdict = "meets" if m.meets(slo) else "MISSES"
            print(f"verify: {m.output_tokens_per_s:.0f} tok/s at {m.request_rate:.2f} req/s, TTFT p95 "
                  f"{(m.ttft_p95_s or 0) * 1000:.0f} ms, ITL p95 {(m.itl_p95_s or 0) * 1000:.0f} ms: {verdict} the SLO",
                  flush=True)
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()))
    print(f"wrote {out}: {files} ({time.monotonic() - started:.0f} s)", flush=True)
    return 0 if best is not None else 1
