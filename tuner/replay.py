"""Offline replay of a recorded response surface: Optuna (this tuner) vs grid search vs random search.

The figure of merit is the number of trials a search runs before it has seen a configuration within
5% of the grid's optimum goodput. The tuner runs exactly as online (constrained TPE, infeasible
configurations and their neighbourhood never run, duplicates not re-run), over grid indices: every
knob's grid is log-spaced or close to it, so an index is an ordinal, log-like coordinate.

`python -m kvpilot.tuner.replay [SURFACE.json] [--seeds 20]` prints the comparison as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from kvpilot.tuner.objective import TrialOutcome
from kvpilot.tuner.space import Knob, SearchSpace
from kvpilot.tuner.study import StudyState, TunerStudy
from kvpilot.tuner.surface import Surface, SurfacePoint, synthetic_surface
from pydantic import BaseModel, ConfigDict, Field


class StrategyResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: str
    trials_to_target: list[int] = Field(description="per seed; the grid size when never reached")
    median: float
    median_share_of_grid: float


class ReplayReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    surface: str
    grid_size: int
    optimum_goodput_per_gpu: float
    target_goodput_per_gpu: float
    default_goodput_per_gpu: float | None
    seeds: int
    strategies: list[StrategyResult]
    tuned_over_default: float | None = Field(description="median best found by Optuna within 25% of the grid, "
                                                         "over the default configuration's goodput")


def index_space(surface: Surface) -> SearchSpace:
    knobs = tuple(Knob(name=k, kind="int", low=0, high=len(v) - 1) for k, v in surface.grid.items())
    return SearchSpace(target="gpu", knobs=knobs, note="grid indices of the recorded surface")


def _point(surface: Surface, table: dict[tuple[float, ...], SurfacePoint], idx: dict[str, float | int]) -> SurfacePoint:
    return table[tuple(float(surface.grid[k][int(idx[k])]) for k in surface.grid)]


def _as_outcome(p: SurfacePoint, slo_itl_ms: float | None, slo_ttft_ms: float | None) -> TrialOutcome:
    if p.status == "infeasible":
        return TrialOutcome(status="infeasible", reason=p.note)
    if p.status == "slo_unmet":
        over = [x / s - 1 for x, s in ((p.itl_p95_ms, slo_itl_ms), (p.ttft_p95_ms, slo_ttft_ms))
                if x is not None and s]
        return TrialOutcome(status="slo_unmet", violation=max([0.01, *over]), reason=p.note)
    return TrialOutcome(status="ok", goodput_per_gpu=p.goodput_per_gpu, goodput_tokens_per_s=p.goodput_per_gpu)


def run_optuna(surface: Surface, seed: int, target: float, budget: int) -> tuple[int, float]:
    """Trials run until a point >= target was seen (budget + 1 when never), and the best after `budget` trials."""
    table = surface.lookup()
    study = TunerStudy(StudyState(space=index_space(surface), seed=seed), n_startup_trials=8)
    itl, ttft = surface.slo.get("itl_p95_ms"), surface.slo.get("ttft_p95_ms")
    reached: int | None = None
    best_in_budget = 0.0
    while study.trials_run < len(surface.points):
        proposal = study.ask()
        if proposal is None:
            break
        p = _point(surface, table, proposal.params)
        study.tell(proposal, _as_outcome(p, itl, ttft), 0.0)
        good = p.status == "ok"
        if good and study.trials_run <= budget:
            best_in_budget = max(best_in_budget, p.goodput_per_gpu)
        if reached is None and good and p.goodput_per_gpu >= target:
            reached = study.trials_run
        if reached is not None and study.trials_run >= budget:
            break
    return (reached if reached is not None else len(surface.points) + 1), best_in_budget


def trials_in_order(order: list[SurfacePoint], target: float) -> int:
    for i, p in enumerate(order, 1):
        if p.status == "ok" and p.goodput_per_gpu >= target:
            return i
    return len(order) + 1


def replay(surface: Surface, seeds: int = 20, within: float = 0.05, budget_share: float = 0.25) -> ReplayReport:
    if seeds < 1:
        raise ValueError("at least one seed")
    optimum = surface.optimum().goodput_per_gpu
    target = optimum * (1 - within)
    n = len(surface.points)
    budget = max(1, int(n * budget_share))
    optuna_runs = [run_optuna(surface, seed, target, budget) for seed in range(seeds)]
    rand = []
    for seed in range(seeds):
        order = list(surface.points)
        random.Random(seed).shuffle(order)
        rand.append(trials_in_order(order, target))
    grid = [trials_in_order(surface.grid_order(), target)] * seeds

    def result(name: str, counts: list[int]) -> StrategyResult:
        med = statistics.median(counts)
        return StrategyResult(strategy=name, trials_to_target=counts, median=med, median_share_of_grid=med / n)

    default = None
    if surface.default_params is not None:
        d = surface.lookup().get(surface.key(surface.default_params))
        default = d.goodput_per_gpu if d is not None and d.status == "ok" else 0.0
    best_found = statistics.median(b for _, b in optuna_runs)
    return ReplayReport(
        surface=surface.description, grid_size=n, optimum_goodput_per_gpu=optimum, target_goodput_per_gpu=target,
        default_goodput_per_gpu=default, seeds=seeds,
        strategies=[result("optuna-tpe", [r for r, _ in optuna_runs]), result("grid", grid), result("random", rand)],
        tuned_over_default=(best_found / default) if default else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvpilot.tuner.replay", description=__doc__)
    parser.add_argument("surface", nargs="?", type=Path, help="a recorded surface JSON (default: the synthetic one)")
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        surface = Surface.model_validate_json(args.surface.read_text()) if args.surface else synthetic_surface()
        report = replay(surface, seeds=args.seeds)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.model_dump(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
