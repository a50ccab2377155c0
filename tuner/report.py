"""What a study leaves behind: best_config.json, every trial as JSON and CSV, and three PNG plots."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from kvpilot.tuner.objective import SLO
from kvpilot.tuner.study import Params, StudyState, TrialRecord, TunerStudy
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class BestConfig(BaseModel):
    """best_config.json: the configuration to deploy and what it was measured to do."""

    model_config = ConfigDict(extra="forbid")

    model: str
    engine: Params = Field(description="EngineConfig fields (vLLM's names)")
    serve_flags: list[str]
    slo: SLO
    goodput_tokens_per_s: float
    goodput_per_gpu: float
    request_rate: float | None
    ttft_p95_ms: float | None
    itl_p95_ms: float | None
    trial: int
    trials_run: int
    memory_knob: str = Field(description="what the memory knob means on this target")
    metrics_source: str
    measured_with: dict[str, Any] = Field(default_factory=dict,
                                          description="workload and load-step settings, to measure it again alike")


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 2)


def best_config(study: TunerStudy, model: str, slo: SLO, serve_flags: list[str],
                measured_with: dict[str, Any] | None = None) -> BestConfig | None:
    best = study.best()
    if best is None:
        return None
    o = best.outcome
    source = next((m.source for m in o.steps if m.source), "")
    return BestConfig(model=model, engine=best.params, serve_flags=serve_flags, slo=slo,
                      goodput_tokens_per_s=round(o.goodput_tokens_per_s, 2),
                      goodput_per_gpu=round(o.goodput_per_gpu, 2),
                      request_rate=o.request_rate, ttft_p95_ms=_ms(o.ttft_p95_s), itl_p95_ms=_ms(o.itl_p95_s),
                      trial=best.number, trials_run=study.trials_run, memory_knob=study.space.note,
                      metrics_source=source, measured_with=measured_with or {})


CSV_FIELDS = ["trial", "ran", "status", "goodput_per_gpu", "goodput_tokens_per_s", "request_rate", "ttft_p95_ms",
              "itl_p95_ms", "duration_s", "note", "reason"]


def write_trials(records: list[TrialRecord], out: Path) -> None:
    knobs = sorted({k for r in records for k in r.params})
    with (out / "trials.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*CSV_FIELDS[:2], *knobs, *CSV_FIELDS[2:]])
        for r in records:
            o = r.outcome
            w.writerow([r.number, r.ran, *(r.params.get(k) for k in knobs), o.status, round(o.goodput_per_gpu, 2),
                        round(o.goodput_tokens_per_s, 2), o.request_rate, _ms(o.ttft_p95_s), _ms(o.itl_p95_s),
                        round(r.duration_s, 2), r.note, o.reason.splitlines()[0] if o.reason else ""])


def save_state(state: StudyState, out: Path) -> None:
    """trials.json is also the study's persistence: `--resume` reloads it."""
    tmp = out / "trials.json.tmp"
    tmp.write_text(state.model_dump_json(indent=2))
    tmp.replace(out / "trials.json")


def load_state(path: Path) -> StudyState:
    try:
        return StudyState.model_validate_json(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot resume from {path}: {exc}") from exc


def plot(study: TunerStudy, out: Path, slo: SLO) -> list[Path]:
    """history.png, importance.png (when enough feasible trials vary), pareto.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written: list[Path] = []
    ran = [r for r in study.records if r.ran]
    fig, ax = plt.subplots(figsize=(6, 4))
    best_so_far, best = [], 0.0
    for r in ran:
        best = max(best, r.outcome.goodput_per_gpu if r.outcome.status == "ok" else 0.0)
        best_so_far.append(best)
    colours = {"ok": "tab:green", "slo_unmet": "tab:orange", "infeasible": "tab:red"}
    for status, colour in colours.items():
        xs = [i for i, r in enumerate(ran) if r.outcome.status == status]
        ax.scatter(xs, [ran[i].outcome.goodput_per_gpu for i in xs], c=colour, label=status, zorder=3)
    ax.step(range(len(ran)), best_so_far, where="post", c="k", label="best feasible")
    ax.set(xlabel="trial run", ylabel="goodput per GPU (tok/s)", title="Optimisation history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "history.png", dpi=100)
    plt.close(fig)
    written.append(out / "history.png")

    importance = _importance(study)
    if importance:
        fig, ax = plt.subplots(figsize=(6, 3))
        names = list(importance)
        ax.barh(names, [importance[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title="Parameter importance")
        fig.tight_layout()
        fig.savefig(out / "importance.png", dpi=100)
        plt.close(fig)
        written.append(out / "importance.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [(m.ttft_p95_s * 1000, m.output_tokens_per_s) for r in ran for m in r.outcome.steps
             if m.ttft_p95_s is not None]
    if steps:
        ax.scatter([x for x, _ in steps], [y for _, y in steps], c="lightgrey", s=12, label="every load step")
    pts = [(r.outcome.ttft_p95_s * 1000, r.outcome.goodput_per_gpu, r.number) for r in ran
           if r.outcome.status == "ok" and r.outcome.ttft_p95_s is not None]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c="tab:blue", label="feasible trials")
        for x, y, n in pts:
            ax.annotate(str(n), (x, y), fontsize=7)
        front = _pareto(pts)
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", label="Pareto front")
    if slo.ttft_p95_ms is not None:
        ax.axvline(slo.ttft_p95_ms, c="tab:red", ls=":", label="TTFT SLO")
    ax.set(xlabel="TTFT p95 (ms)", ylabel="goodput per GPU (tok/s)", title="TTFT vs goodput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=100)
    plt.close(fig)
    written.append(out / "pareto.png")
    return written


def _pareto(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Lower TTFT and higher goodput are both better: keep the points no other beats on both."""
    front, best = [], -1.0
    for p in sorted(points):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def _importance(study: TunerStudy) -> dict[str, float]:
    import optuna

    feasible = [t for t in study.study.trials if t.state.is_finished() and t.params]
    if len({t.value for t in feasible}) < 2 or not feasible[0].params:
        log.debug("parameter importance needs at least two trials with different goodput: no importance.png")
        return {}
    try:
        return optuna.importance.get_param_importances(study.study)
    except (RuntimeError, ValueError) as exc:
        log.info("no importance.png: %s", exc)
        return {}


def write_report(study: TunerStudy, out: Path, model: str, slo: SLO, serve_flags: list[str],
                 measured_with: dict[str, Any] | None = None) -> BestConfig | None:
    out.mkdir(parents=True, exist_ok=True)
    save_state(study.state, out)
    write_trials(study.records, out)
    best = best_config(study, model, slo, serve_flags, measured_with)
    if best is not None:
        (out / "best_config.json").write_text(best.model_dump_json(indent=2))
    else:
        (out / "best_config.json").unlink(missing_ok=True)
    plot(study, out, slo)
    return best


def summary_line(best: BestConfig | None) -> str:
    if best is None:
        return "no configuration met the SLO"
    return (f"best: trial {best.trial} {json.dumps(best.engine)} -> {best.goodput_per_gpu:.0f} tok/s per GPU at "
            f"{best.request_rate:.2f} req/s, TTFT p95 {best.ttft_p95_ms} ms, ITL p95 {best.itl_p95_ms} ms")
