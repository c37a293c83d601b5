"""Analytic bounds on the decoupling distance (DESIGN.md §2, "analytic decoupling bounds" row).

Both follow from one step of the twin recursion with shared randomness. With ``F_S``, ``F_H`` the
losses the two runs descend, ``d_k = ‖w^S_k - w^H_k‖`` and ``E >= ‖∇F_S(w^H_k) - ∇F_H(w^H_k)‖``:

    d_{k+1} <= ‖(w^S_k - η∇F_S(w^S_k)) - (w^H_k - η∇F_S(w^H_k))‖ + η E  <=  ρ d_k + η E,

where ``ρ = 1 + ηM`` if ∇F_S is M-Lipschitz (Gronwall) and ``ρ = max(|1 - ηm|, |1 - ηM|)`` if F_S is
also m-strongly convex (the gradient step is then a contraction). Unrolling from d_0 = 0 gives
``d_k <= η E (ρ^k - 1)/(ρ - 1)``. Shared noise (Lévy or Gaussian) cancels in the difference.

These hold for full-batch gradient descent with the true constants. In a trial, M̂ and Ê are
*estimates* (power iteration at a few iterates; gradients at recorded iterates only) and minibatch SGD
has a larger per-step mismatch than Ê, so the logged values are diagnostics, not certificates. For
long runs the Gronwall bound is astronomically loose; it is logged anyway and flagged vacuous.
"""

from __future__ import annotations

import math

from hsgd_tune.bound import _checks


def gronwall_bound(eta: float, smoothness: float, mismatch: float, steps: int) -> float:
    """``d_k <= E((1 + ηM)^k - 1)/M`` (``ηkE`` when M = 0); ``inf`` on overflow.

    Args:
        eta: step size η > 0.
        smoothness: M >= 0, a Lipschitz constant of ∇F_S (top Hessian eigenvalue for a quadratic).
        mismatch: E >= 0, a bound on ``‖∇F_S(w^H_k) - ∇F_H(w^H_k)‖`` along the reference run.
        steps: k >= 0.
    """
    eta, smoothness, mismatch, steps = _inputs(eta, smoothness, mismatch, steps)
    if smoothness == 0.0:
        return eta * steps * mismatch
    exponent = steps * math.log1p(eta * smoothness)
    if exponent > 700.0:
        return math.inf
    return mismatch * math.expm1(exponent) / smoothness


def contractive_bound(
    eta: float, strong_convexity: float, smoothness: float, mismatch: float, steps: int
) -> float:
    """``d_k <= ηE(1 - ρ^k)/(1 - ρ)``, ``ρ = max(|1 - ηm|, |1 - ηM|)``; ``<= E/m`` when η <= 2/(m+M).

    ``inf`` when ρ >= 1 (step too large for the contraction argument).

    Args:
        eta: step size η > 0.
        strong_convexity: m > 0 (e.g. the L2 weight decay of a convex model).
        smoothness: M >= m.
        mismatch: E >= 0.
        steps: k >= 0.
    """
    eta, smoothness, mismatch, steps = _inputs(eta, smoothness, mismatch, steps)
    m = _checks.positive("strong_convexity", strong_convexity)
    if smoothness < m:
        raise ValueError(f"smoothness must be >= strong_convexity={m!r}, got {smoothness!r}")
    rho = max(abs(1.0 - eta * m), abs(1.0 - eta * smoothness))
    if rho >= 1.0:
        return math.inf
    return eta * mismatch * (1.0 - rho**steps) / (1.0 - rho)


def _inputs(eta, smoothness, mismatch, steps):
    eta = _checks.positive("eta", eta)
    smoothness = _checks.real("smoothness", smoothness)
    mismatch = _checks.real("mismatch", mismatch)
    if smoothness < 0 or mismatch < 0:
        raise ValueError(f"smoothness and mismatch must be >= 0, got {smoothness!r} and {mismatch!r}")
    return eta, smoothness, mismatch, _checks.count("steps", steps, minimum=0)
