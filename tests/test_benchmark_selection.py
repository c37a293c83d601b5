"""The selection benchmark's rules (benchmarks/selection.py), on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from benchmarks.selection import PEER, RULES, heldout_certificate, one_se_pick, paired, picks, tolerance_pick
from hsgd_tune.bound import binary_kl


def test_one_se_pick_takes_the_smallest_preference_within_one_se_of_the_best():
    estimate = np.array([0.50, 0.52, 0.60, 0.51])
    se = np.array([0.03, 0.01, 0.01, 0.01])  # the best trial's SE (0.03) sets the band: ≤ 0.53
    prefer = np.array([9.0, 3.0, 1.0, 5.0])
    assert one_se_pick(estimate, se, prefer) == 1  # trial 2 (smallest prefer) is outside the band


def test_one_se_pick_with_zero_se_is_the_best_estimate():
    assert one_se_pick(np.array([0.3, 0.2, 0.4]), np.zeros(3), np.array([1.0, 9.0, 0.1])) == 1


def test_tolerance_pick_is_the_landed_rank_rule():
    estimate, prefer = np.array([1.00, 1.04, 1.06]), np.array([5.0, 2.0, 1.0])
    assert tolerance_pick(estimate, prefer, 0.05) == 1  # 1.06 is more than 5 % above the best


def test_heldout_certificate_is_the_kl_inverse_at_the_union_bound_level():
    errors = np.array([1.0] * 10 + [0.0] * 90)  # ê = 0.1 on n = 100
    bound = heldout_certificate(errors, n_candidates=24, task="classification")
    c = math.log(24 / 0.05) / 100
    assert bound > 0.1 and binary_kl(0.1, bound) == pytest.approx(c, rel=1e-6)


def test_heldout_certificate_of_a_regression_clips_and_scales_the_loss():
    losses = np.array([10.0, 0.0])  # clipped at B = 5, divided by B: mean 0.5
    assert heldout_certificate(losses, 1, "regression") == pytest.approx(
        heldout_certificate(np.array([1.0, 0.0]), 1, "classification")
    )


def test_paired_interval_is_the_t_interval_of_the_differences():
    diff = np.array([0.1, -0.2, 0.05, 0.3])
    mean, low, high = paired(diff)
    half = stats.t.ppf(0.975, 3) * diff.std(ddof=1) / 2
    assert (mean, low, high) == pytest.approx((diff.mean(), diff.mean() - half, diff.mean() + half))


def test_picks_on_two_trials_where_validation_and_crossfit_disagree():
    # Trial 0 looks better on the 2 V rows, trial 1 on H and by cross-fit; trial 1 is better on test.
    trials = pd.DataFrame(
        {
            "val_loss": [np.array([0.1, 0.1, 9.0]), np.array([0.3, 0.3, 0.0])],
            "held_loss": [np.array([0.6, 0.8]), np.array([0.4, 0.5])],
            "held_error": [np.array([1.0, 0.0]), np.array([0.0, 0.0])],
            "cross_loss": [np.array([0.7, 0.7]), np.array([0.5, 0.6])],
            "gap_bound": [1.0, 2.0],
            "risk_bound": [1.0, 2.0],
            "test_loss": [0.7, 0.5],
        }
    )
    chosen = picks(trials, n_val=2, task="classification")
    assert chosen["val (V)"] == 0  # only the first 2 rows of V count
    assert chosen[PEER] == 1 and chosen["crossfit"] == 1 and chosen["heldout cert"] == 1
    assert chosen["oracle"] == 1
    assert tuple(chosen) == RULES  # the tables list every rule, in this order
