"""The complexity term C and the per-configuration confidence level δ_λ = δ·π(λ)."""

from __future__ import annotations

import itertools
import math

import pytest

from hsgd_tune.bound import complexity_term, configuration_delta


def test_configuration_delta_is_delta_times_the_prior_weight():
    assert configuration_delta(0.05, 1 / 105) == pytest.approx(0.05 / 105, rel=1e-15)


def test_configuration_delta_of_a_single_configuration_is_delta():
    assert configuration_delta(0.1, 1.0) == 0.1


@pytest.mark.parametrize("delta", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf, "0.05", None])
def test_configuration_delta_rejects_delta_outside_open_unit_interval(delta):
    with pytest.raises(ValueError, match="delta must be"):
        configuration_delta(delta, 0.5)


@pytest.mark.parametrize("weight", [0.0, -0.5, 1.5, math.nan, True])
def test_configuration_delta_rejects_a_weight_outside_zero_one(weight):
    with pytest.raises(ValueError, match="prior_weight must be"):
        configuration_delta(0.05, weight)


def test_complexity_term_hand_computed_with_one_reference_point():
    # B=2, n=50, N=1 (ln N = 0), δ_s = e^-4 (ln 1/δ_s = 4): C = 2·sqrt(4/100) = 2·0.2 = 0.4.
    assert complexity_term(2.0, 50, 1, math.exp(-4.0)) == pytest.approx(0.4, rel=1e-14)


def test_complexity_term_hand_computed_with_union_bound_over_points():
    # B=1, n=8, N=4, δ_s = 4·e^-16: ln N + ln 1/δ_s = ln(N/δ_s) = 16; C = sqrt(16/16) = 1.
    assert complexity_term(1.0, 8, 4, 4.0 * math.exp(-16.0)) == pytest.approx(1.0, rel=1e-14)


def test_complexity_term_is_linear_in_loss_clip():
    assert complexity_term(3.0, 100, 10, 0.01) == pytest.approx(
        3.0 * complexity_term(1.0, 100, 10, 0.01), rel=1e-14
    )


def test_complexity_term_decreases_with_more_training_examples():
    values = [complexity_term(1.0, n, 10, 0.01) for n in (10, 100, 1000, 10_000)]
    assert all(later < earlier for earlier, later in itertools.pairwise(values))


def test_complexity_term_increases_with_more_reference_points():
    values = [complexity_term(1.0, 100, n_points, 0.01) for n_points in (1, 10, 100, 1000)]
    assert all(later > earlier for earlier, later in itertools.pairwise(values))


def test_complexity_term_increases_as_delta_t_shrinks():
    assert complexity_term(1.0, 100, 10, 1e-6) > complexity_term(1.0, 100, 10, 1e-2)


def test_complexity_term_survives_a_delta_t_whose_reciprocal_overflows():
    # ln(1/5e-324) = 744.44...: finite even though 1/5e-324 is inf in float64.
    assert math.isfinite(complexity_term(1.0, 100, 10, 5e-324))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.0, 50, 1, 0.01), "loss_clip must be > 0"),
        ((-1.0, 50, 1, 0.01), "loss_clip must be > 0"),
        ((math.inf, 50, 1, 0.01), "loss_clip must be a finite real number"),
        ((1.0, 0, 1, 0.01), "n must be an integer >= 1"),
        ((1.0, 50.0, 1, 0.01), "n must be an integer >= 1"),
        ((1.0, 50, 0, 0.01), "n_points must be an integer >= 1"),
        ((1.0, 50, 1, 0.0), r"delta_t must be in the open interval \(0, 1\)"),
        ((1.0, 50, 1, 1.0), r"delta_t must be in the open interval \(0, 1\)"),
    ],
)
def test_complexity_term_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        complexity_term(*args)
