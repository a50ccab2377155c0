"""The replay benchmark: Optuna vs grid vs random search on a response surface, over 20 seeds."""

from __future__ import annotations

import pytest
from kvpilot.tuner.replay import replay, trials_in_order
from kvpilot.tuner.surface import Surface, synthetic_surface


def test_optuna_reaches_5_percent_of_the_grid_optimum_in_a_quarter_of_its_trials() -> None:
    surface = synthetic_surface()
    report = replay(surface, seeds=20)
    by = {s.strategy: s for s in report.strategies}
    optuna, grid, rand = by["optuna-tpe"], by["grid"], by["random"]
    print(f"\nreplay over {report.seeds} seeds on {report.grid_size} points: optuna median {optuna.median} trials "
          f"({optuna.median_share_of_grid:.1%}), random {rand.median} ({rand.median_share_of_grid:.1%}), "
          f"grid {grid.median} ({grid.median_share_of_grid:.1%})")
    assert len(optuna.trials_to_target) == 20
    assert optuna.median_share_of_grid <= 0.25
    assert optuna.median < rand.median < grid.median


def test_surface_must_be_a_complete_grid() -> None:
    s = synthetic_surface()
    with pytest.raises(ValueError, match="exactly once"):
        Surface(description="x", source="synthetic", grid=s.grid, points=s.points[:-1])


def test_trials_in_order_counts_until_the_target() -> None:
    s = synthetic_surface()
    best = s.optimum()
    assert trials_in_order([best], best.goodput_per_gpu) == 1
    assert trials_in_order([], 1.0) == 1
