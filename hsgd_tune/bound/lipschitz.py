"""The Lipschitz estimate ``L̂`` of the clipped loss (DESIGN.md §2, "Lipschitz estimate" row).

The decoupling lemma needs ``g = R_B - R̂_{S,B}`` to be 2L-Lipschitz in the weights, where L is a
Lipschitz constant of the clipped per-example loss ``ℓ_B(w, z)`` in w (Dupuis & Viallard,
arXiv 2312.00427). L is a supremum over *all* weights and *all* data points; we can only look at a
few weights (the recorded iterates) and a few examples (a subsample), so ``L̂`` is an ESTIMATE: it
may be smaller than L, and a bound that uses it is never called certified.
"""

from __future__ import annotations

import numpy as np

from hsgd_tune.bound import _checks


def lipschitz_estimate(grad_norms: np.ndarray) -> float:
    """``L̂ = max`` of the recorded per-example gradient norms of ``ℓ_B``.

    This is an estimate, not a certified constant: the true L is a sup over every weight and every
    data point, and the max over the recorded iterates and a fixed subsample of S ∪ H can only
    under-estimate it. Bounds that use ``L̂`` hold "if L̂ >= L" (DESIGN.md §2).

    Args:
        grad_norms: array of any shape, e.g. (2, N, m) = (run, recorded iterate, subsample example),
            of Euclidean norms ``|∇_w ℓ_B(w_k, z_i)|``. Where ``ℓ > B`` the clipped loss is flat,
            so its gradient norm is 0; the caller applies that rule.

    Returns:
        The largest entry, >= 0.
    """
    grad_norms = _checks.finite_array("grad_norms", grad_norms)
    if np.any(grad_norms < 0.0):
        smallest = float(np.min(grad_norms))
        raise ValueError(f"grad_norms must be >= 0 (they are norms), got a minimum of {smallest!r}")
    return float(np.max(grad_norms))
