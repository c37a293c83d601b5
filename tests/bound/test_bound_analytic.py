"""Analytic decoupling bounds (hsgd_tune.bound.analytic) against their recursion and a quadratic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hsgd_tune.bound import contractive_bound, gronwall_bound


def unrolled(rho: float, eta: float, mismatch: float, steps: int) -> float:
    d = 0.0
    for _ in range(steps):
        d = rho * d + eta * mismatch
    return d


@pytest.mark.parametrize("steps", [0, 1, 7, 50])
def test_gronwall_equals_its_recursion(steps):
    assert gronwall_bound(0.1, 3.0, 0.5, steps) == pytest.approx(unrolled(1.3, 0.1, 0.5, steps), rel=1e-12)


def test_gronwall_without_curvature_is_linear():
    assert gronwall_bound(0.1, 0.0, 0.5, 20) == pytest.approx(0.1 * 20 * 0.5)


def test_contractive_equals_its_recursion_and_stays_below_e_over_m():
    eta, m, big_m, e = 0.1, 0.5, 4.0, 0.3
    rho = max(abs(1 - eta * m), abs(1 - eta * big_m))
    for steps in (0, 3, 100, 10_000):
        value = contractive_bound(eta, m, big_m, e, steps)
        assert value == pytest.approx(unrolled(rho, eta, e, steps), rel=1e-9)
        assert value <= e / m + 1e-12


def test_vacuous_cases_are_infinite():
    assert gronwall_bound(1.0, 10.0, 1.0, 10_000) == math.inf
    assert contractive_bound(1.0, 0.1, 5.0, 1.0, 10) == math.inf  # |1 - ηM| = 4: no contraction


def twin_gradient_descent(eta, steps, seed, noise_scale=0.0):
    """Full-batch GD on two least-squares problems (S and H), shared init and shared heavy-tailed noise.

    Returns the distances d_k, the exact E along the reference run, and M, m of F_S.
    """
    rng = np.random.default_rng(seed)
    n, d = 40, 5
    xs, xh = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    w_true = rng.normal(size=d)
    ys, yh = xs @ w_true + rng.normal(size=n), xh @ w_true + rng.normal(size=n)
    a_s, a_h = 2 * xs.T @ xs / n, 2 * xh.T @ xh / n  # Hessians of F(w) = mean (xw - y)²
    grad_s = lambda w: a_s @ w - 2 * xs.T @ ys / n  # noqa: E731
    grad_h = lambda w: a_h @ w - 2 * xh.T @ yh / n  # noqa: E731
    w_s = w_h = rng.normal(size=d)
    dists, gaps = [0.0], []
    for _ in range(steps):
        gaps.append(np.linalg.norm(grad_s(w_h) - grad_h(w_h)))
        shared = noise_scale * rng.standard_cauchy() * rng.normal(size=d)  # heavy-tailed, same for both
        w_s, w_h = w_s - eta * grad_s(w_s) + shared, w_h - eta * grad_h(w_h) + shared
        dists.append(np.linalg.norm(w_s - w_h))
    eig = np.linalg.eigvalsh(a_s)
    return np.array(dists), max(gaps), eig[-1], eig[0]


@pytest.mark.parametrize("noise_scale", [0.0, 0.05])
@pytest.mark.parametrize("eta", [0.05, 0.2])
def test_measured_distance_never_exceeds_the_bounds_on_least_squares(eta, noise_scale):
    dists, e, big_m, m = twin_gradient_descent(eta, 200, seed=int(eta * 100), noise_scale=noise_scale)
    for k, d in enumerate(dists):
        assert d <= gronwall_bound(eta, big_m, e, k) * (1 + 1e-9) + 1e-12
        assert d <= contractive_bound(eta, m, big_m, e, k) * (1 + 1e-9) + 1e-12
    assert contractive_bound(eta, m, big_m, e, 200) < gronwall_bound(eta, big_m, e, 200)


def test_rejects_bad_constants():
    with pytest.raises(ValueError, match="smoothness must be >= strong_convexity"):
        contractive_bound(0.1, 2.0, 1.0, 1.0, 3)
    with pytest.raises(ValueError, match="eta must be > 0"):
        gronwall_bound(0.0, 1.0, 1.0, 3)
