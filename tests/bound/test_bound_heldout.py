"""The held-out certificate: a kl-inverse binomial bound, checked against scipy's binomial tail, a
bisection, the exact Clopper-Pearson bound, and a simulation of its coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from hsgd_tune.bound import heldout_certificate, heldout_upper


def naive_kl_inverse(q: float, c: float) -> float:
    """Bisection on kl(q ‖ p) <= c over p in [q, 1], the obviously-correct reference."""

    def kl(p: float) -> float:
        terms = [a * math.log(a / b) for a, b in ((q, p), (1 - q, 1 - p)) if a > 0]
        return sum(terms)

    low, high = q, 1.0 - 1e-15
    if kl(high) <= c:
        return 1.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if kl(mid) <= c else (low, mid)
    return high


@pytest.mark.parametrize(("errors", "n", "delta"), [(0, 100, 0.05), (12, 500, 0.001), (250, 500, 0.01)])
def test_heldout_upper_is_the_kl_inverse_of_ln_one_over_delta_over_n(errors, n, delta):
    expected = naive_kl_inverse(errors / n, math.log(1 / delta) / n)
    assert heldout_upper(errors / n, n, delta) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(("errors", "n", "delta"), [(0, 100, 0.05), (12, 500, 0.001), (250, 500, 0.01)])
def test_heldout_upper_is_valid_by_the_binomial_tail_and_above_clopper_pearson(errors, n, delta):
    upper = heldout_upper(errors / n, n, delta)
    # At the bound, seeing this few errors has probability at most δ (Chernoff): a valid bound.
    assert stats.binom.cdf(errors, n, upper) <= delta
    # The exact (Clopper-Pearson) one-sided bound is the smallest valid one; Chernoff is above it.
    exact = stats.beta.ppf(1 - delta, errors + 1, n - errors) if errors < n else 1.0
    assert exact <= upper <= exact + 0.05


def test_heldout_upper_covers_the_true_error_at_least_one_minus_delta_of_the_time():
    rng = np.random.default_rng(0)
    p, n, delta = 0.2, 200, 0.1
    counts = rng.binomial(n, p, size=4000)
    misses = sum(heldout_upper(k / n, n, delta) < p for k in counts)
    assert misses / len(counts) <= delta


def test_heldout_certificate_splits_its_delta_between_the_final_model_and_all_iterates():
    errors = np.array([0.9, 0.4, 0.1, 0.05])
    last, every = heldout_certificate(errors, 500, 0.02)
    assert last == pytest.approx(heldout_upper(0.05, 500, 0.01))
    assert every == pytest.approx(max(heldout_upper(e, 500, 0.01 / 4) for e in errors))


@pytest.mark.parametrize("errors", [np.array([1.2]), np.array([-0.1, 0.2]), np.array([np.nan])])
def test_heldout_certificate_rejects_errors_outside_zero_one(errors):
    with pytest.raises(ValueError, match="errors must"):
        heldout_certificate(errors, 10, 0.05)
