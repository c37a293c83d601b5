"""The PAC-Bayes certificate's arithmetic (hsgd_tune.bound.pacbayes) against references by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hsgd_tune.bound import (
    binary_kl,
    certificate,
    gaussian_kl,
    geometric_grid,
    kl_inverse_upper,
    mc_error_upper,
    pac_bayes_kl_bound,
)


def bisection_kl_inverse(q: float, c: float, iterations: int = 200) -> float:
    """The obviously-correct reference: halve [q, 1] while kl(q‖mid) <= c."""
    lo, hi = q, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if mid >= 1.0:  # kl(q ‖ 1) is infinite for q < 1
            break
        kl = (q * math.log(q / mid) if q > 0 else 0.0) + (1 - q) * math.log((1 - q) / (1 - mid))
        lo, hi = (mid, hi) if kl <= c else (lo, mid)
    return lo


@pytest.mark.parametrize("q", [0.0, 0.01, 0.1, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("c", [1e-4, 0.01, 0.1, 0.5, 2.0])
def test_kl_inverse_matches_bisection(q, c):
    value = kl_inverse_upper(q, c)
    assert value == pytest.approx(bisection_kl_inverse(q, c), abs=1e-9)
    assert value >= bisection_kl_inverse(q, c) - 1e-15  # never understates


def test_kl_inverse_of_zero_has_a_closed_form():
    # kl(0 ‖ p) = -ln(1 - p), so the inverse is 1 - e^{-c}.
    for c in (0.01, 0.3, 3.0):
        assert kl_inverse_upper(0.0, c) == pytest.approx(1 - math.exp(-c), abs=1e-11)


def test_binary_kl_by_hand():
    assert binary_kl(0.5, 0.25) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert binary_kl(0.2, 0.2) == 0.0
    assert binary_kl(0.5, 1.0) == math.inf


def test_gaussian_kl_matches_the_full_covariance_formula():
    rng = np.random.default_rng(0)
    p = 6
    mu_q, mu_p = rng.normal(size=p), rng.normal(size=p)
    var_q, var_p = rng.uniform(0.1, 2.0, size=p), 0.7
    cov_q, cov_p = np.diag(var_q), var_p * np.eye(p)
    inv_p = np.linalg.inv(cov_p)
    diff = mu_p - mu_q
    reference = 0.5 * (
        np.trace(inv_p @ cov_q)
        + diff @ inv_p @ diff
        - p
        + np.log(np.linalg.det(cov_p) / np.linalg.det(cov_q))
    )
    assert gaussian_kl(mu_q, var_q, mu_p, var_p) == pytest.approx(reference, rel=1e-12)


def test_isotropic_kl_is_the_design_formula():
    # DESIGN.md §2: KL = ‖w_S - w_H‖² / (2σ²) when both have variance σ².
    w_s, w_h, sigma = np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 1.0]), 0.5
    assert gaussian_kl(w_s, sigma**2, w_h, sigma**2) == pytest.approx(5.0 / (2 * 0.25))


def test_pac_bayes_bound_hand_computed():
    # ê = 0, KL = 10, n = 100, δ = 0.05: c = (10 + ln(2·10/0.05)) / 100 = (10 + ln 400) / 100.
    c = (10 + math.log(400)) / 100
    assert pac_bayes_kl_bound(0.0, 10.0, 100, 0.05) == pytest.approx(1 - math.exp(-c), abs=1e-10)
    assert pac_bayes_kl_bound(0.0, 10.0, 100, 0.05) == pytest.approx(0.147783, abs=1e-6)


def test_certificate_composes_the_two_steps_with_the_delta_split():
    cert = certificate(
        mc_error=0.05, mc_samples=2000, kl=20.0, n=500, delta=0.01, prior_std=0.1, grid_size=41
    )
    upper = mc_error_upper(0.05, 2000, 0.005)
    assert cert.error_upper == upper
    assert cert.bound == pac_bayes_kl_bound(upper, 20.0, 500, 0.005 / 41)
    assert 0.05 < upper < cert.bound < 1
    assert set(cert.metrics()) >= {"certificate/bound", "certificate/kl", "certificate/mc_samples"}
    assert all(text for text in cert.assumptions().values())


def test_bound_grows_with_kl_and_shrinks_with_n():
    assert pac_bayes_kl_bound(0.1, 5.0, 500, 0.01) < pac_bayes_kl_bound(0.1, 50.0, 500, 0.01)
    assert pac_bayes_kl_bound(0.1, 5.0, 5000, 0.01) < pac_bayes_kl_bound(0.1, 5.0, 500, 0.01)


def test_monte_carlo_upper_bound_covers_the_mean_at_rate_delta():
    # Hoeffding/Langford-Caruana: P(upper < true mean) <= δ. 4000 repetitions of m = 200 Bernoullis.
    rng = np.random.default_rng(0)
    p, m, delta, reps = 0.07, 200, 0.1, 4000
    means = rng.binomial(m, p, size=reps) / m
    misses = sum(mc_error_upper(float(e), m, delta) < p for e in means)
    assert misses / reps <= delta  # in practice far fewer: the bound is two-sided at ln(2/δ)


def test_geometric_grid_is_geometric():
    grid = geometric_grid(1e-4, 1.0, 41)
    assert grid[0] == pytest.approx(1e-4) and grid[-1] == pytest.approx(1.0)
    assert np.allclose(grid[1:] / grid[:-1], 10 ** (4 / 40))


def test_rejects_what_the_theorem_excludes():
    with pytest.raises(ValueError, match="n must be an integer >= 8"):
        pac_bayes_kl_bound(0.1, 1.0, 7, 0.05)
    with pytest.raises(ValueError, match="kl must be >= 0"):
        pac_bayes_kl_bound(0.1, -1.0, 100, 0.05)
    with pytest.raises(ValueError, match="q must be in"):
        kl_inverse_upper(1.5, 0.1)
