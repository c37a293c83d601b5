"""The perturbed-dynamics certificate against a naive loop over its definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hsgd_tune.bound import gaussian_kl, kl_inverse_upper, perturbed_bounds


def naive_perturbed(mc_errors, m, w_s, w_h, sigmas, n, grid, delta):
    """Per step: MC kl correction with δ/2/N, Maurer with δ/2/(N·G) and the closed-form Gaussian KL."""
    steps = len(mc_errors)
    out = []
    for k in range(steps):
        upper = kl_inverse_upper(mc_errors[k], math.log(2 / (delta / 2 / steps)) / m)
        kl = gaussian_kl(w_s[k], sigmas[k] ** 2, w_h[k], sigmas[k] ** 2)
        c = (kl + math.log(2 * math.sqrt(n) / (delta / 2 / (steps * grid)))) / n
        out.append(kl_inverse_upper(upper, c))
    return np.array(out)


def test_perturbed_bounds_match_the_naive_loop_with_the_gaussian_kl():
    rng = np.random.default_rng(5)
    w_s, w_h = rng.normal(size=(6, 20)), rng.normal(size=(6, 20)) * 0.1
    distances = np.linalg.norm(w_s - w_h, axis=1)
    sigmas = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    mc = np.array([0.1, 0.2, 0.3, 0.05, 0.0, 0.5])
    got = perturbed_bounds(mc, 1000, distances, sigmas, 500, 41, 0.01)
    np.testing.assert_allclose(got, naive_perturbed(mc, 1000, w_s, w_h, sigmas, 500, 41, 0.01), rtol=1e-9)


def test_equal_iterates_cost_no_kl_and_a_larger_grid_costs_more():
    zero = perturbed_bounds(np.array([0.1]), 1000, np.array([0.0]), np.array([1.0]), 500, 1, 0.05)
    assert zero[0] == pytest.approx(
        kl_inverse_upper(
            kl_inverse_upper(0.1, math.log(2 / 0.025) / 1000), math.log(2 * math.sqrt(500) / 0.025) / 500
        )
    )
    wider = perturbed_bounds(np.array([0.1]), 1000, np.array([0.0]), np.array([1.0]), 500, 41, 0.05)
    assert wider[0] > zero[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"sigmas": np.array([0.0, 1.0])}, "sigmas must be > 0"),
        ({"distances": np.array([1.0])}, "one entry per recorded step"),
        ({"delta": 0.0}, "delta must be"),
    ],
)
def test_perturbed_bounds_reject_bad_input(override, message):
    args = {
        "mc_errors": np.array([0.1, 0.2]),
        "mc_terms": 100,
        "distances": np.array([1.0, 2.0]),
        "sigmas": np.array([1.0, 1.0]),
        "n": 100,
        "grid_size": 3,
        "delta": 0.05,
    }
    with pytest.raises(ValueError, match=message):
        perturbed_bounds(**{**args, **override})
