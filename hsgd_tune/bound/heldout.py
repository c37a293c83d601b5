"""The held-out certificate of the S-model (DESIGN.md §2, "held-out certificate" row).

The S-run never trains on H, so the errors of an S-iterate on H are n_H independent draws of its
error: the Chernoff bound for a binomial (or, for errors in [0, 1], Maurer 2004 / Hoeffding 1963 in kl
form) gives, with probability ≥ 1 − δ, ``kl(ê_H ‖ e) ≤ ln(1/δ)/n_H`` whenever ``e ≥ ê_H``, hence
``e ≤ kl^{-1}(ê_H, ln(1/δ)/n_H)``: a one-sided kl-inverse (Langford 2005, "Tutorial on practical
prediction theory", test-set bound).
"""

from __future__ import annotations

import math

import numpy as np

from hsgd_tune.bound import _checks
from hsgd_tune.bound.pacbayes import kl_inverse_upper

_ASSUMPTIONS = {
    "heldout_error": (
        "certified: kl-inverse binomial (test-set) bound on the error of the final S-model from its "
        "errors on H, which the S-run never trains on (it sees H only through the feature means and "
        "scales used to standardise, data/datasets.py); its share of δ_λ"
    ),
    "heldout_error_max": (
        "certified: the same for every recorded S-iterate at once (union bound over the N iterates); "
        "the largest of them"
    ),
}


def heldout_upper(mean_error: float, n: int, delta: float) -> float:
    """``kl^{-1}(ê, ln(1/δ)/n)``: an upper bound on the error e of a model independent of the n
    held-out examples, from its mean error ê on them, holding with probability ≥ 1 − δ.

    Args:
        mean_error: ê in [0, 1], the mean 0-1 error (or ``ℓ_B/B``) on the held-out examples.
        n: number of held-out examples, >= 1.
        delta: failure probability, in (0, 1).

    Returns:
        The bound in [ê, 1].
    """
    n = _checks.count("n", n)
    delta = _checks.probability("delta", delta)
    return kl_inverse_upper(mean_error, math.log(1.0 / delta) / n)


def heldout_certificate(errors: np.ndarray, n: int, delta: float) -> tuple[float, float]:
    """The two held-out statements of one configuration, sharing its held-out δ equally.

    Args:
        errors: (N,) mean error on H of each recorded S-iterate, the last being the final S-model.
        n: |H| >= 1.
        delta: the configuration's held-out share of δ_λ.

    Returns:
        ``(last, all_max)``: the bound on the final model's error (confidence δ/2), and the largest
        of the bounds on every recorded iterate's error, holding all at once (δ/2 over N: union bound).
    """
    errors = _checks.finite_array("errors", errors).ravel()
    if np.any((errors < 0.0) | (errors > 1.0)):
        raise ValueError(f"errors must lie in [0, 1], got range [{errors.min()!r}, {errors.max()!r}]")
    delta = _checks.probability("delta", delta)
    last = heldout_upper(float(errors[-1]), n, delta / 2.0)
    every = delta / 2.0 / errors.size
    # kl^{-1}(q, c) increases with q, so the largest bound is that of the largest error.
    return last, heldout_upper(float(errors.max()), n, every)


def assumptions() -> dict[str, str]:
    return {f"certificate/{k}": v for k, v in _ASSUMPTIONS.items()}
