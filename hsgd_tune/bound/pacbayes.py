"""The PAC-Bayes certificate of one trial (DESIGN.md §2, "PAC-Bayes certificate" row).

The certified statement is about the *stochastic* predictor Q (draw weights ``w ~ Q``, predict): with
probability ``>= 1 - δ`` over S and the Monte-Carlo draws, its expected error ``e_Q`` (0-1 error, or
``ℓ_B/B`` for regression) is at most the returned ``bound``. Nothing rests on a Lipschitz or smoothness
estimate.

Ingredients, each a pure function below:

* the prior ``P = N(μ_H, λ I)`` is centred on the reference run's final weights, which do not depend on
  S; its variance ``λ`` is one point of a geometric grid fixed in advance (union bound over the grid);
* the posterior ``Q = N(μ_S, diag s²)`` may depend on S in any way (learned means and variances);
* Maurer's PAC-Bayes-kl bound (Maurer 2004; Seeger 2002): ``kl(ê_Q ‖ e_Q) <= (KL(Q‖P) + ln(2√n/δ)) / n``
  for losses in [0, 1] and n >= 8;
* ``ê_Q`` is estimated from m independent terms ``err(w_j, z_{i_j})``, ``w_j ~ Q``, whose mean is ê_Q
  (one draw re-used on all of S, as Langford & Caruana 2001, or — tighter at equal cost — a fresh
  draw for every (example, repeat) pair); Hoeffding (1963, Thm 1) in kl form:
  ``kl(ê_Q^MC ‖ ê_Q) <= ln(2/δ')/m`` with probability ``>= 1 - δ'``.

The δ bookkeeping (``certificate``): the trial's certificate share δ_c is split in half, δ_c/2 for the
PAC-Bayes step (divided again over the λ grid) and δ_c/2 for the Monte-Carlo step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from hsgd_tune.bound import _checks

# What each logged number rests on (tags ``hsgd.assumption.certificate/…``).
_ASSUMPTIONS = {
    "bound": (
        "certified: PAC-Bayes-kl (Maurer 2004) for the stochastic predictor Q = N(mu, diag s^2), prior "
        "N(w_H, lambda I) independent of S, lambda on a fixed grid (union bound), Monte-Carlo "
        "kl correction (Langford & Caruana 2001); no Lipschitz or smoothness assumption"
    ),
    "kl": "exact: closed-form KL between the Gaussian posterior and prior",
    "mc_error": "measured: mean error on S of m weight draws from Q",
    "error_upper": "certified: Monte-Carlo kl upper bound on the expected empirical error of Q",
    "prior_std": "chosen: grid point of the prior's standard deviation (union bound over the grid)",
}


@dataclass(frozen=True)
class Certificate:
    """One trial's PAC-Bayes certificate. Build with :func:`certificate`."""

    bound: float  # upper bound on e_Q, the expected test error of Q (0-1, or ℓ_B/B)
    kl: float  # KL(Q ‖ P)
    mc_error: float  # ê_Q^MC, mean error on S over the m draws
    error_upper: float  # kl-upper bound on ê_Q from the m draws
    mc_samples: int  # m
    n_train: int  # n
    prior_std: float  # sqrt(λ)
    grid_size: int  # |λ grid|
    delta: float  # δ_c, the certificate's share of the trial's δ

    @property
    def vacuous(self) -> bool:
        """True when the bound says nothing: at least 1 (or at least the trivial bound, see metrics)."""
        return self.bound >= 1.0

    def metrics(self) -> dict[str, float]:
        names = ("bound", "kl", "mc_error", "error_upper", "mc_samples", "prior_std", "grid_size", "delta")
        return {f"certificate/{name}": float(getattr(self, name)) for name in names}

    def assumptions(self) -> dict[str, str]:
        return {f"certificate/{k}": v for k, v in _ASSUMPTIONS.items()}


def binary_kl(q: float, p: float) -> float:
    """``kl(q ‖ p) = q ln(q/p) + (1-q) ln((1-q)/(1-p))``, Bernoulli KL, with ``0 ln 0 = 0``.

    Args:
        q, p: probabilities in [0, 1].

    Returns:
        kl in [0, ∞]; ∞ when p is 0 or 1 and q differs from it.
    """
    q, p = _unit("q", q), _unit("p", p)
    return _kl(q, p)


def _kl(q: float, p: float) -> float:
    total = 0.0
    for a, b in ((q, p), (1.0 - q, 1.0 - p)):
        if a > 0.0:
            if b <= 0.0:
                return math.inf
            total += a * math.log(a / b)
    return max(total, 0.0)


def kl_inverse_upper(q: float, c: float) -> float:
    """``sup {p ∈ [q, 1] : kl(q ‖ p) <= c}``: the upper kl-inverse (Seeger 2002).

    Found with Brent's method on the increasing function ``p ↦ kl(q ‖ p) - c`` on [q, 1); the root is
    returned rounded *up* by the solver's tolerance, so the result never understates the bound.

    Args:
        q: empirical value in [0, 1].
        c: the right-hand side, >= 0.

    Returns:
        p in [q, 1]; 1 when even p → 1 keeps kl below c.
    """
    q = _unit("q", q)
    c = _checks.real("c", c)
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c!r}")
    if c == 0.0 or q >= 1.0:
        return q
    high = 1.0 - 1e-15
    if _kl(q, high) <= c:
        return 1.0
    tol = 1e-12
    root = brentq(lambda p: _kl(q, p) - c, q, high, xtol=tol, rtol=4 * np.finfo(float).eps)
    return min(1.0, root + tol)


def gaussian_kl(mu_q: np.ndarray, var_q: np.ndarray, mu_p: np.ndarray, var_p: float) -> float:
    """``KL(N(μ_q, diag var_q) ‖ N(μ_p, var_p I))`` in closed form.

    ``½ [Σ var_q/var_p + ‖μ_q - μ_p‖²/var_p - p + p ln var_p - Σ ln var_q]``. With ``var_q = var_p = σ²``
    everywhere it is DESIGN.md's ``‖μ_q - μ_p‖²/(2σ²)``.

    Args:
        mu_q: (p,) posterior mean.
        var_q: (p,) posterior variances, > 0 (a scalar broadcasts).
        mu_p: (p,) prior mean.
        var_p: prior variance λ > 0.

    Returns:
        KL >= 0.
    """
    mu_q = _checks.finite_array("mu_q", mu_q).ravel()
    mu_p = _checks.finite_array("mu_p", mu_p).ravel()
    if mu_q.shape != mu_p.shape:
        raise ValueError(f"mu_q and mu_p must have the same shape, got {mu_q.shape!r} and {mu_p.shape!r}")
    var_q = np.broadcast_to(_checks.finite_array("var_q", var_q).ravel(), mu_q.shape)
    if np.any(var_q <= 0):
        raise ValueError(f"var_q must be > 0, got a minimum of {float(var_q.min())!r}")
    var_p = _checks.positive("var_p", var_p)
    ratio = var_q / var_p
    dist2 = float(np.sum((mu_q - mu_p) ** 2))
    # Σ (r - 1 - ln r) is >= 0 term by term; summed this way it keeps its precision when r ≈ 1.
    return 0.5 * (float(np.sum(ratio - 1.0 - np.log(ratio))) + dist2 / var_p)


def geometric_grid(low: float, high: float, size: int) -> np.ndarray:
    """(size,) points ``low · (high/low)^(j/(size-1))``, fixed before seeing S (the union-bound grid)."""
    low, high = _checks.positive("low", low), _checks.positive("high", high)
    size = _checks.count("size", size)
    if size > 1 and not low < high:
        raise ValueError(f"high must exceed low, got low={low!r}, high={high!r}")
    return np.geomspace(low, high, size) if size > 1 else np.array([low])


def snap_to_grid(value: float, grid: np.ndarray) -> float:
    """The grid point nearest to ``value`` on a log scale."""
    value = _checks.positive("value", value)
    grid = _checks.finite_array("grid", grid)
    return float(grid[np.argmin(np.abs(np.log(grid) - math.log(value)))])


def mc_error_upper(mc_error: float, m: int, delta: float) -> float:
    """Upper bound on ``ê_Q`` from m terms: ``kl^{-1}(ê_Q^MC, ln(2/δ)/m)`` (Langford & Caruana 2001;
    Hoeffding 1963, Thm 1, for independent terms in [0, 1] with mean ê_Q).

    Args:
        mc_error: mean of m independent terms in [0, 1] whose expectations average to ê_Q: the errors on
            S of m draws ``w_j ~ Q``, or the errors of n·r (example, fresh draw) pairs.
        m: number of independent terms, >= 1.
        delta: failure probability of this step.
    """
    m = _checks.count("m", m)
    delta = _checks.probability("delta", delta)
    return kl_inverse_upper(mc_error, math.log(2.0 / delta) / m)


def pac_bayes_kl_bound(empirical_error: float, kl: float, n: int, delta: float) -> float:
    """Maurer's bound: ``kl^{-1}(ê_Q, (KL + ln(2√n/δ)) / n)``; valid for losses in [0, 1], n >= 8.

    Args:
        empirical_error: ê_Q (or an upper bound on it, e.g. :func:`mc_error_upper`).
        kl: KL(Q ‖ P) >= 0 with P chosen before seeing S.
        n: |S| >= 8.
        delta: failure probability of this step.
    """
    kl = _checks.real("kl", kl)
    if kl < 0:
        raise ValueError(f"kl must be >= 0, got {kl!r}")
    n = _checks.count("n", n, minimum=8)
    delta = _checks.probability("delta", delta)
    return kl_inverse_upper(empirical_error, (kl + math.log(2.0 * math.sqrt(n) / delta)) / n)


def certificate(
    mc_error: float, mc_samples: int, kl: float, n: int, delta: float, prior_std: float, grid_size: int
) -> Certificate:
    """Assemble the certificate: δ/2 to the Monte-Carlo step, δ/2 over the prior grid.

    Args:
        mc_error: ê_Q^MC, the mean of ``mc_samples`` independent error terms (see :func:`mc_error_upper`).
        mc_samples: m >= 1, the number of independent terms.
        kl: KL(Q ‖ P) with P's variance ``prior_std²`` a point of a grid of ``grid_size`` points
            fixed before seeing S.
        n: |S| >= 8.
        delta: δ_c, the certificate's share of the trial's confidence level.
        prior_std: sqrt(λ), reported.
        grid_size: size of the prior-variance grid (union bound).

    Returns:
        A :class:`Certificate`: with probability >= 1 - δ_c, ``e_Q <= bound``.
    """
    delta = _checks.probability("delta", delta)
    grid_size = _checks.count("grid_size", grid_size)
    upper = mc_error_upper(mc_error, mc_samples, delta / 2.0)
    bound = pac_bayes_kl_bound(upper, kl, n, delta / 2.0 / grid_size)
    return Certificate(
        bound=bound,
        kl=float(kl),
        mc_error=float(mc_error),
        error_upper=upper,
        mc_samples=int(mc_samples),
        n_train=int(n),
        prior_std=_checks.positive("prior_std", prior_std),
        grid_size=grid_size,
        delta=delta,
    )


def _unit(name: str, value: float) -> float:
    value = _checks.real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value
