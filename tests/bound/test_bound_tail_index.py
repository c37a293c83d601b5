"""The tail index α̂ (hsgd_tune.bound.tail_index; Mohammadi et al. 2015) on samples of known α."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import levy_stable

from hsgd_tune.bound import tail_index
from hsgd_tune.bound.tail_index import BLOCK_SIZES, MIN_BLOCKS, log_abs_variance, tail_index_block

K = 100_000  # draws per test


def alpha_tolerance(alpha: float, k: int) -> float:
    """Four standard deviations of α̂, from the sample size.

    At block size K1 (K2 = K // K1 blocks), ``1/α̂ = (mean_K2 ln|Y| - mean_K ln|X|) / ln K1`` and each
    log-mean has variance ``Var ln|X| / count`` with ``Var ln|X| = π²/12 (1 + 2/α²)``; so
    ``sd(1/α̂) <= sqrt(Var)(1/sqrt(K2) + 1/sqrt(K)) / ln K1`` whatever their correlation. The median over
    block sizes is within the largest of these deviations, and ``dα = α² d(1/α)``.
    """
    v = log_abs_variance(alpha)
    used = [b for b in BLOCK_SIZES if k // b >= MIN_BLOCKS]
    sd_inv = max(math.sqrt(v) * (1 / math.sqrt(k // b) + 1 / math.sqrt(k)) / math.log(b) for b in used)
    tol_inv = 4 * sd_inv
    return alpha**2 * tol_inv / (1 - alpha * tol_inv)


@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.8, 2.0])
def test_recovers_alpha_of_symmetric_stable_samples(alpha):
    samples = levy_stable.rvs(alpha, 0.0, size=K, random_state=np.random.default_rng(int(alpha * 10)))
    tol = alpha_tolerance(alpha, K)
    assert tol < 0.25  # informative: from ±0.08 at α = 1.2 to ±0.22 at α = 2 with K = 1e5
    assert abs(tail_index(samples) - alpha) <= tol


def test_scale_and_location_do_not_matter():
    x = levy_stable.rvs(1.5, 0.0, size=20_000, random_state=np.random.default_rng(1))
    assert tail_index(7.0 * x + 3.0) == pytest.approx(tail_index(x), abs=1e-9)


def test_coordinates_of_different_scales_pool_without_bias():
    # (K, d): each column its own scale; blocks sum within a column, so scales cancel.
    rng = np.random.default_rng(2)
    scales = np.logspace(-3, 2, 40)
    x = levy_stable.rvs(1.4, 0.0, size=(4096, 40), random_state=rng) * scales
    assert abs(tail_index(x, center=False) - 1.4) <= 0.1


def test_single_block_matches_the_formula_by_hand():
    x = np.array([1.0, -2.0, 4.0, 0.5])  # blocks of 2: sums -1.0 and 4.5
    expected = (np.mean(np.log([1.0, 4.5])) - np.mean(np.log([1.0, 2.0, 4.0, 0.5]))) / math.log(2)
    assert tail_index_block(x, 2) == pytest.approx(expected, rel=1e-12)


def test_gaussian_noise_is_clipped_to_two():
    x = np.random.default_rng(3).normal(size=50_000)
    assert 1.9 <= tail_index(x) <= 2.0


def test_log_abs_variance_matches_gaussian_closed_form():
    # α = 2 is N(0, 2): Var ln|Z| = π²/8 for any Gaussian.
    assert log_abs_variance(2.0) == pytest.approx(math.pi**2 / 8)


def test_rejects_too_few_draws():
    with pytest.raises(ValueError, match="at least 4 draws"):
        tail_index(np.ones(3))
