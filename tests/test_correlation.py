"""Kendall's τ and the granulated Kendall Ψ (Jiang et al. 2020, §3), against hand-computed cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from hsgd_tune.advise.correlation import granulated_kendall, kendall_tau

# ---------------------------------------------------------------------------------------------
# kendall_tau


def test_tau_hand_computed_one_discordant_pair_of_three():
    # pairs (0,1) +·+, (0,2) +·+, (1,2) +·− → (2 − 1) / 3
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3, rel=1e-15)


def test_tau_is_one_for_same_order_and_minus_one_for_reversed_order():
    assert kendall_tau([0.1, 5, 7, 9], [1, 2, 3, 4]) == 1.0
    assert kendall_tau([4, 3, 2, 1], [1, 2, 3, 4]) == -1.0


def test_tau_b_with_ties_hand_computed():
    # m = [1,1,2,3], g = [1,2,2,3]: pair (0,1) tied in m, pair (1,2) tied in g, the other 4 concordant.
    # τ-b = 4 / sqrt((6 − 1)(6 − 1)) = 0.8
    assert kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8, rel=1e-15)


def test_tau_matches_scipy_on_random_inputs_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(3, 30))
        m = rng.integers(0, 6, n).astype(float)  # few distinct values: many ties
        g = rng.normal(size=n) + 0.3 * m
        g[rng.random(n) < 0.2] = 1.0  # ties in the gap too
        if len(set(m)) < 2 or len(set(g)) < 2:
            continue
        assert kendall_tau(m, g) == pytest.approx(kendalltau(m, g).statistic, abs=1e-12)


def test_tau_of_a_constant_measure_is_zero_where_scipy_gives_nan():
    # The documented convention: a measure that orders nothing carries no ranking information.
    assert kendall_tau([2, 2, 2], [1, 2, 3]) == 0.0
    assert kendall_tau([1, 2, 3], [5, 5, 5]) == 0.0
    assert math.isnan(kendalltau([2, 2, 2], [1, 2, 3]).statistic)


def test_tau_drops_trials_with_nan_in_measure_or_gap():
    assert kendall_tau([1, math.nan, 2, 3], [1, 9, 2, 3]) == 1.0
    # left: m = [1, 2, 4], g = [1, 2, 0] → pairs +, −, − → (1 − 2) / 3
    assert kendall_tau([1, 2, 3, 4], [1, 2, math.nan, 0]) == pytest.approx(-1 / 3, rel=1e-15)


def test_tau_keeps_infinite_values_as_extremes():
    # An infinite (vacuous) bound still ranks above every finite one; inf == inf is a tie.
    assert kendall_tau([1, math.inf, 2], [1, 3, 2]) == 1.0
    assert kendall_tau([math.inf, math.inf, 1], [2, 3, 1]) == pytest.approx(
        kendalltau([1e300, 1e300, 1], [2, 3, 1]).statistic, rel=1e-12
    )


def test_tau_with_fewer_than_two_trials_is_nan():
    assert math.isnan(kendall_tau([1.0], [2.0]))
    assert math.isnan(kendall_tau([1.0, math.nan], [2.0, 3.0]))


def test_tau_rejects_arrays_of_different_lengths():
    with pytest.raises(ValueError, match="same length"):
        kendall_tau([1, 2, 3], [1, 2])


# ---------------------------------------------------------------------------------------------
# granulated_kendall


def _grid_2x2() -> pd.DataFrame:
    return pd.DataFrame({"lr": [0.1, 0.1, 0.2, 0.2], "b": [8, 16, 8, 16]})


def test_granulated_2x2_grid_worked_by_hand():
    # rows (lr, b) → measure, gap: (.1,8) → 1,1; (.1,16) → 2,2; (.2,8) → 3,4; (.2,16) → 4,3
    # ψ_lr: b=8: m 1→3, g 1→4 (τ=+1); b=16: m 2→4, g 2→3 (τ=+1) → ψ_lr = 1
    # ψ_b: lr=.1: m 1→2, g 1→2 (τ=+1); lr=.2: m 3→4, g 4→3 (τ=−1) → ψ_b = 0
    # Ψ = (1 + 0) / 2 = 0.5; over all trials τ = (5 − 1) / 6 = 2/3.
    measure, gap = [1, 2, 3, 4], [1, 2, 4, 3]
    big_psi, psi = granulated_kendall(measure, gap, _grid_2x2())
    assert psi == {"lr": 1.0, "b": 0.0}
    assert big_psi == 0.5
    assert kendall_tau(measure, gap) == pytest.approx(2 / 3, rel=1e-15)


def test_a_measure_blind_to_batch_size_gets_psi_zero_for_it():
    # The point of Ψ (Jiang et al. §3): tracking lr alone can score well on τ, not on ψ_b.
    hp = _grid_2x2()
    gap = [1, 2, 3, 4]
    big_psi, psi = granulated_kendall(hp["lr"], gap, hp)
    assert psi == {"lr": 1.0, "b": 0.0}
    assert big_psi == 0.5


def test_groups_with_one_distinct_value_contribute_nothing():
    # (lr, b): (.1,8) (.2,8) (.1,16). ψ_lr: only the b=8 group varies lr; ψ_b: only the lr=.1 group.
    hp = pd.DataFrame({"lr": [0.1, 0.2, 0.1], "b": [8, 8, 16]})
    _, psi = granulated_kendall([1, 2, 3], [2, 1, 3], hp)
    assert psi == {"lr": -1.0, "b": 1.0}


def test_nan_trial_is_dropped_before_grouping():
    # Dropping (.2,16) leaves the lr=.2 group with one value of b and the b=16 group with one lr.
    big_psi, psi = granulated_kendall([1, 2, 3, math.nan], [1, 2, 4, 3], _grid_2x2())
    assert psi == {"lr": 1.0, "b": 1.0}
    assert big_psi == 1.0


def test_psi_is_nan_when_no_group_varies_and_big_psi_averages_the_rest():
    hp = pd.DataFrame({"lr": [0.1, 0.2, 0.3], "b": [8, 16, 32]})  # a diagonal: no group varies
    big_psi, psi = granulated_kendall([1, 2, 3], [1, 2, 3], hp)
    assert math.isnan(psi["lr"]) and math.isnan(psi["b"]) and math.isnan(big_psi)


def test_with_a_single_hyperparameter_psi_is_tau():
    hp = pd.DataFrame({"lr": [1, 2, 3, 4, 5]})
    m, g = [1, 3, 2, 5, 4], [1, 2, 3, 4, 5]
    big_psi, psi = granulated_kendall(m, g, hp)
    assert psi["lr"] == big_psi == pytest.approx(kendall_tau(m, g), rel=1e-15)


def test_granulated_matches_a_naive_loop_on_a_3x4_grid_with_seeds():
    rng = np.random.default_rng(1)
    rows = list(itertools.product([0.01, 0.1, 1.0], [8, 16, 32, 64], [0, 1]))
    hp = pd.DataFrame(rows, columns=["lr", "b", "seed"])
    m, g = rng.normal(size=len(hp)), rng.normal(size=len(hp))
    big_psi, psi = granulated_kendall(m, g, hp)
    for name in hp.columns:
        others = [c for c in hp.columns if c != name]
        taus = []
        for key in {tuple(r) for r in hp[others].itertuples(index=False)}:
            idx = [i for i in range(len(hp)) if tuple(hp.loc[i, others]) == key]
            taus.append(kendalltau(m[idx], g[idx]).statistic)
        assert psi[name] == pytest.approx(np.mean(taus), abs=1e-12)
    assert big_psi == pytest.approx(np.mean(list(psi.values())), abs=1e-12)


def test_granulated_rejects_misaligned_inputs_and_nan_hyperparameters():
    with pytest.raises(ValueError, match="one entry per trial"):
        granulated_kendall([1, 2, 3], [1, 2, 3], _grid_2x2())
    hp = _grid_2x2().astype(float)
    hp.loc[0, "lr"] = math.nan
    with pytest.raises(ValueError, match="must not contain NaN"):
        granulated_kendall([1, 2, 3, 4], [1, 2, 3, 4], hp)
