"""The perturbed-dynamics certificate: the seed paper's PAC-Bayesian setting (DESIGN.md §2 row).

At every recorded step k the S-run iterate is perturbed, ``Q_k = N(w^S_k, σ_k² I)``, against the prior
``P_k = N(w^H_k, σ_k² I)`` centred on the reference iterate of the same step, which never sees S. Then

    KL(Q_k ‖ P_k) = ‖w^S_k − w^H_k‖² / (2σ_k²),

the geometric (decoupling) term of Dupuis & Viallard (arXiv 2312.00427) itself, and Maurer's
PAC-Bayes-kl bound (Maurer 2004) gives ``kl(ê_{Q_k} ‖ e_{Q_k}) ≤ (KL + ln(2√n/δ'))/n``. σ_k is any
point of a grid of G values fixed in advance, chosen after seeing S: a union bound over the N steps
and the G grid points pays for it (δ'= δ/2/(N·G)). ê_{Q_k} is estimated by Monte Carlo with fresh
draws, m independent terms per step, with its own kl correction ``ln(2/δ'')/m`` (Langford & Caruana
2001), δ'' = δ/2/N. Nothing rests on a Lipschitz or smoothness estimate: certified, for the perturbed
predictor Q_k (weights drawn at prediction time), with probability ≥ 1 − δ for all k at once.
"""

from __future__ import annotations

import numpy as np

from hsgd_tune.bound import _checks
from hsgd_tune.bound.pacbayes import mc_error_upper, pac_bayes_kl_bound

_ASSUMPTIONS = {
    "perturbed_bound": (
        "certified: PAC-Bayes-kl (Maurer 2004) for Q = N(w_S, σ²I) at the last recorded step against "
        "P = N(w_H, σ²I) of the same step (independent of S), KL = |w_S - w_H|²/(2σ²); σ on a fixed grid, "
        "union bound over the grid and the recorded steps; Monte-Carlo kl correction"
    ),
    "perturbed_bound_max": "certified: the same statement at every recorded step at once; the largest",
}


def perturbed_bounds(
    mc_errors: np.ndarray,
    mc_terms: int,
    distances: np.ndarray,
    sigmas: np.ndarray,
    n: int,
    grid_size: int,
    delta: float,
) -> np.ndarray:
    """(N,) bounds on ``e_{Q_k}``, the expected error of the perturbed S-iterate at each recorded step.

    Args:
        mc_errors: (N,) Monte-Carlo mean error on S of Q_k (``mc_terms`` independent terms in [0, 1]
            each, drawn independently of how σ_k was chosen).
        mc_terms: m >= 1, the number of independent terms behind each ``mc_errors[k]``.
        distances: (N,) ``‖w^S_k − w^H_k‖``, same-step distances.
        sigmas: (N,) σ_k > 0, each a point of a grid of ``grid_size`` values fixed before seeing S.
        n: |S| >= 8.
        grid_size: G >= 1.
        delta: the configuration's perturbed-certificate share of δ_λ.

    Returns:
        (N,) the bounds; all hold at once with probability ≥ 1 − δ.
    """
    mc_errors = _checks.finite_array("mc_errors", mc_errors).ravel()
    distances = _checks.finite_array("distances", distances).ravel()
    sigmas = _checks.finite_array("sigmas", sigmas).ravel()
    if not mc_errors.shape == distances.shape == sigmas.shape:
        raise ValueError(
            "mc_errors, distances and sigmas must have one entry per recorded step, got shapes "
            f"{mc_errors.shape!r}, {distances.shape!r}, {sigmas.shape!r}"
        )
    if np.any(sigmas <= 0.0):
        raise ValueError(f"sigmas must be > 0, got a minimum of {float(sigmas.min())!r}")
    delta = _checks.probability("delta", delta)
    grid_size = _checks.count("grid_size", grid_size)
    steps = mc_errors.size
    delta_mc = delta / 2.0 / steps  # one Monte-Carlo estimate per step
    delta_pb = delta / 2.0 / (steps * grid_size)  # every (step, σ) pair
    kls = distances**2 / (2.0 * sigmas**2)
    return np.array(
        [
            pac_bayes_kl_bound(mc_error_upper(float(e), mc_terms, delta_mc), float(kl), n, delta_pb)
            for e, kl in zip(mc_errors, kls, strict=True)
        ]
    )


def assumptions() -> dict[str, str]:
    return {f"certificate/{k}": v for k, v in _ASSUMPTIONS.items()}
