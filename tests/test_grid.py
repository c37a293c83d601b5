"""The configuration grid Λ and the union bound over it (DESIGN.md §2, "Confidence across a study")."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import optuna
import pytest

from hsgd_tune.bound import complexity_term
from hsgd_tune.search.study import FAIL_REASON, make_sampler, sample_params
from hsgd_tune.studyfile import grid
from hsgd_tune.studyfile.config import Knob, SearchConfig, load_study

QUICKSTART = Path(__file__).resolve().parents[1] / "studies" / "quickstart.toml"


def test_a_log_learning_rate_range_gets_points_per_decade_log_spaced_points_ends_included():
    knob = Knob("learning_rate", "float", low=0.005, high=0.5, log=True, points_per_decade=10)
    values = grid.knob_values(knob)
    assert len(values) == 21 and values[0] == 0.005 and values[-1] == 0.5
    ratios = np.diff(np.log10(values))
    assert np.all(ratios > 0) and np.allclose(ratios, 0.1, atol=1e-5)


def test_a_range_that_is_not_a_whole_number_of_steps_keeps_its_ends_and_no_wider_step():
    knob = Knob("learning_rate", "float", low=0.003, high=0.5, log=True, points_per_decade=4)
    values = grid.knob_values(knob)
    assert values[0] == 0.003 and values[-1] == 0.5
    assert np.max(np.diff(np.log10(values))) <= 1 / 4 + 1e-9


def test_other_knob_kinds_have_their_grids():
    assert grid.knob_values(Knob("batch_size", "int", low=10, high=100, log=True)) == (10, 16, 32, 64, 100)
    assert grid.knob_values(Knob("batch_size", "categorical", choices=(8, 32))) == (8, 32)
    assert grid.knob_values(Knob("m", "float", low=0.0, high=0.9, grid_points=4)) == (0.0, 0.3, 0.6, 0.9)
    assert grid.knob_values(Knob("k", "int", low=2, high=5)) == (2, 3, 4, 5)


def test_snap_takes_the_nearest_grid_point_on_the_knobs_scale():
    lr = Knob("learning_rate", "float", low=0.001, high=1.0, log=True, points_per_decade=1)
    assert grid.snap(lr, 0.0031) == 0.001 and grid.snap(lr, 0.0032) == 0.01  # √10 ≈ 3.162: the midpoint
    assert grid.snap(Knob("b", "int", low=8, high=128, log=True), 45) == 32
    assert grid.snap(Knob("m", "float", low=0.0, high=1.0, grid_points=3), 0.3) == 0.5
    for value in np.geomspace(0.001, 1.0, 50):
        assert grid.snap(lr, grid.snap(lr, value)) == grid.snap(lr, value)  # idempotent


def test_the_quickstart_grid_has_105_configurations_and_each_statement_an_equal_share():
    cfg = load_study(QUICKSTART)
    assert cfg.grid_size == 21 * 5 == grid.grid_size(cfg.search)
    deltas = grid.statement_deltas(cfg)
    assert set(deltas) == {"trajectory", "heldout", "perturbed", "pacbayes"}
    assert sum(deltas.values()) == pytest.approx(cfg.bound.delta / 105, rel=1e-12)
    assert len(set(deltas.values())) == 1


def test_the_delta_shares_do_not_depend_on_the_run_budget():
    """A study may be extended: δ is divided over Λ, not over the trials."""
    cfg = load_study(QUICKSTART)
    longer = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, n_trials=500))
    assert grid.statement_deltas(longer) == grid.statement_deltas(cfg)


@pytest.mark.parametrize("kind", ["tpe", "random", "grid", "nsga2"])
def test_every_sampler_proposes_grid_points_and_stores_what_is_trained(kind):
    cfg = load_study(QUICKSTART)
    cfg = dataclasses.replace(cfg, sampler=dataclasses.replace(cfg.sampler, kind=kind))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(cfg, 0))
    lr_grid = grid.knob_values(cfg.search.learning_rate)
    for _ in range(14):
        trial = study.ask()
        params = sample_params(trial, cfg)
        assert params["learning_rate"] in lr_grid
        assert trial.params == params  # the sampler saw the snapped value
        study.tell(trial, [params["learning_rate"], 1.0 / params["batch_size"]])
    assert len(study.trials) == 14


def _small_grid(cfg, kind: str, decades: float, batch_sizes: tuple[int, ...]):
    """The quick-start's knobs (a log-scaled float learning rate, batch-size choices) on a small grid:
    3 points per decade over ``decades`` decades below 1."""
    rate = dataclasses.replace(cfg.search.learning_rate, low=10.0**-decades, high=1.0, points_per_decade=3)
    batch = dataclasses.replace(cfg.search.batch_size, choices=batch_sizes)
    search = dataclasses.replace(cfg.search, learning_rate=rate, batch_size=batch)
    return dataclasses.replace(cfg, search=search, sampler=dataclasses.replace(cfg.sampler, kind=kind))


def _ask_and_tell(cfg, n_trials: int) -> list[tuple]:
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(cfg, 0))
    seen = []
    for _ in range(n_trials):
        trial = study.ask()
        params = sample_params(trial, cfg)
        seen.append((params["learning_rate"], params["batch_size"]))
        # An objective with one clear optimum, so that TPE keeps proposing near it.
        study.tell(trial, [abs(math.log10(params["learning_rate"]) + 1.5), abs(params["batch_size"] - 32)])
    return seen


@pytest.mark.parametrize("kind", ["tpe", "random", "nsga2"])
def test_no_configuration_is_trained_twice_while_the_grid_has_fresh_ones(kind):
    """A configuration's numbers are deterministic given the study: a second trial of it is wasted."""
    cfg = load_study(QUICKSTART)
    cfg = _small_grid(cfg, kind, 3, (16, 32, 64))
    assert len(grid.knob_values(cfg.search.learning_rate)) == 10  # 30 configurations
    seen = _ask_and_tell(cfg, 24)
    assert len(set(seen)) == len(seen)


def test_a_budget_beyond_the_grid_repeats_configurations_once_all_are_taken():
    cfg = _small_grid(load_study(QUICKSTART), "tpe", 1 / 3, (32, 64))  # learning rates 10^-1/3 and 1
    points = {(lr, b) for lr in grid.knob_values(cfg.search.learning_rate) for b in (32, 64)}
    seen = _ask_and_tell(cfg, 7)
    assert len(points) == 4 and set(seen[:4]) == points
    assert len(seen) == 7


def test_running_trials_and_trials_failed_by_rule_hold_their_configuration():
    """Workers sharing a study do not train one configuration side by side, and a configuration that
    diverged is not tried again."""
    cfg = _small_grid(load_study(QUICKSTART), "tpe", 1 / 3, (32, 64))  # 4 configurations
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(cfg, 0))
    diverged = study.ask()
    first = sample_params(diverged, cfg)
    diverged.set_user_attr(FAIL_REASON, "diverged")
    study.tell(diverged, state=optuna.trial.TrialState.FAIL)
    running = [study.ask() for _ in range(3)]  # asked by three workers, none told yet
    configurations = [tuple(sample_params(t, cfg).values()) for t in running]
    assert len(set(configurations)) == 3 and tuple(first.values()) not in configurations


# ---------------------------------------------------------------------------------------------
# The adaptive adversary (the reason for the union over Λ)
# ---------------------------------------------------------------------------------------------

N_EXAMPLES, N_BASE, REPETITIONS, DELTA = 500, 50, 300, 0.1


def _adversarial_config():
    """A study whose searched knobs are the weights w_i ∈ {-1, 0, 1} of 50 fixed base classifiers:
    configuration λ predicts sign(Σ w_i h_i(x)), deterministic given λ (like W^H given λ)."""
    cfg = load_study(QUICKSTART)
    weights = tuple(Knob(f"w_{i:02d}", "categorical", choices=(-1, 0, 1)) for i in range(N_BASE))
    search = SearchConfig(
        learning_rate=Knob("learning_rate", "categorical", choices=(0.1,)),
        batch_size=Knob("batch_size", "categorical", choices=(32,)),
        knobs=weights,
    )
    return dataclasses.replace(cfg, search=search, bound=dataclasses.replace(cfg.bound, delta=DELTA))


def _failure_rate(statement_delta: float) -> float:
    """How often some trial's statement ``R(λ) ≤ R̂_S(λ) + C`` is false in a study of 51 trials.

    Labels are pure noise (±1 coin flips independent of x), so every classifier's risk is exactly 0.5.
    The sampler queries each base classifier alone (λ = e_i), then builds its last configuration
    from their errors on S: the signs that made each one look better than chance (Dwork et al. 2015's
    attack on adaptive data analysis). C is Hoeffding for one fixed point, ``complexity_term`` with
    N = 1 and B = 1: the same step that bounds R − R̂_S on each reference iterate.
    """
    c = complexity_term(1.0, N_EXAMPLES, 1, statement_delta)
    failures = 0
    for repetition in range(REPETITIONS):
        rng = np.random.default_rng(repetition)
        y = rng.choice([-1, 1], N_EXAMPLES)
        base = rng.choice([-1, 1], (N_BASE, N_EXAMPLES))  # h_i(x_j), fixed before S is seen
        errors = list((base != y).mean(axis=1))  # trials 0..49: λ = e_i
        signs = np.where(np.array(errors) < 0.5, 1, -1)  # chosen from results on S
        vote = np.sign(signs @ base)
        vote[vote == 0] = 1
        errors.append(float((vote != y).mean()))  # trial 50: λ = signs, a point of Λ
        failures += any(e + c < 0.5 for e in errors)
    return failures / REPETITIONS


def test_a_union_over_trial_numbers_fails_under_an_adaptive_sampler():
    """The old split: δ/max_trials per trial, halved between its statements. The per-trial statement
    is false far more often than δ: the last configuration depends on S."""
    trials = N_BASE + 1
    rate = _failure_rate(DELTA / trials / len(grid.statements(_adversarial_config())))
    assert rate > 5 * DELTA, rate


def test_the_union_over_the_configuration_grid_holds_under_the_same_adversary():
    """What the study computes for each configuration (grid.statement_deltas): at most δ, whatever
    the sampler does. A revert to a union over trials makes this fail (see the test above)."""
    cfg = _adversarial_config()
    assert cfg.grid_size == 3**N_BASE
    rate = _failure_rate(grid.statement_deltas(cfg)["trajectory"])
    assert rate <= DELTA, rate
    assert math.isclose(grid.statement_deltas(cfg)["trajectory"], DELTA / 3**N_BASE / 4)
