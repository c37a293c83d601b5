"""The selection benchmark's advisor rule (benchmarks/selection.py), on hand-made cases."""

from __future__ import annotations

import math

import numpy as np

from benchmarks.selection import advisor_pick, one_se_tolerance


def test_advisor_picks_the_smallest_bound_among_trials_within_tolerance_of_the_best():
    val = np.array([0.50, 0.52, 0.60, 0.51])
    bound = np.array([9.0, 3.0, 1.0, 5.0])
    # within 0.05 of 0.50: trials 0, 1, 3 → smallest bound is trial 1 (trial 2 is too far on val).
    assert advisor_pick(val, bound, tolerance=0.05) == 1


def test_advisor_with_zero_tolerance_is_the_validation_pick():
    val = np.array([0.3, 0.2, 0.4])
    assert advisor_pick(val, np.array([1.0, 9.0, 0.1]), tolerance=0.0) == 1


def test_advisor_breaks_ties_in_the_bound_by_validation_loss():
    val = np.array([0.31, 0.30, 0.32])
    assert advisor_pick(val, np.array([2.0, 2.0, 2.0]), tolerance=1.0) == 1


def test_one_se_tolerance_hand_computed():
    # losses 1, 2, 3: sd (ddof=1) = 1, n = 3 → SE = 1/sqrt(3)
    assert math.isclose(one_se_tolerance(np.array([1.0, 2.0, 3.0])), 1 / math.sqrt(3), rel_tol=1e-15)
