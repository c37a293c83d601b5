"""The complexity term ``C`` of the trajectory bound (DESIGN.md §2, "complexity" row).

The reference trajectory ``W^H`` is a finite set of N points that does not depend on S. For each
fixed point, Hoeffding's inequality bounds the gap of a loss in [0, B]; a union bound over the N
points gives ``sup_{W^H} (R_B - R̂_{S,B}) <= B * sqrt((ln N + ln(1/δ)) / (2n))`` with probability
``>= 1 - δ``. This is how Dupuis & Viallard (arXiv 2312.00427, decoupling lemma) replace the
mutual-information term: the data-independent trajectory carries the complexity.
"""

from __future__ import annotations

import math

from hsgd_tune.bound import _checks


def configuration_delta(delta: float, prior_weight: float) -> float:
    """Confidence level of one configuration λ: ``δ_λ = δ·π(λ)``.

    A study reports statements about every configuration it evaluates, and an adaptive sampler
    chooses the configurations from earlier results on S, so the statements must hold at once for
    every configuration the sampler *could* choose: a union bound over the grid Λ fixed before the
    data is seen, with prior weights Σπ ≤ 1 (DESIGN.md §2, "Confidence across a study"). A union over
    the trial index instead (δ/max_trials) does not hold under an adaptive sampler.

    Args:
        delta: the study's confidence level δ, in (0, 1).
        prior_weight: π(λ) in (0, 1], e.g. ``1/|Λ|`` for the uniform prior.

    Returns:
        ``δ·π(λ)``, in (0, 1).
    """
    delta = _checks.probability("delta", delta)
    prior_weight = _checks.positive("prior_weight", prior_weight)
    if prior_weight > 1.0:
        raise ValueError(f"prior_weight must be in (0, 1], got {prior_weight!r}")
    return delta * prior_weight


def complexity_term(loss_clip: float, n: int, n_points: int, delta_t: float) -> float:
    """``C = B * sqrt((ln N + ln(1/δ_s)) / (2n))``: Hoeffding + union bound over N points.

    Source: DESIGN.md §2 (complexity row); Dupuis & Viallard, arXiv 2312.00427, decoupling lemma.

    Args:
        loss_clip: B > 0, the clip level; the clipped loss ``ℓ_B = min(ℓ, B)`` lies in [0, B].
        n: n >= 1, the number of training examples in S.
        n_points: N >= 1, the number of recorded reference iterates (the finite set ``W^H``).
        delta_t: δ_s in (0, 1), this statement's confidence level (see ``configuration_delta``).

    Returns:
        The complexity term C > 0 (ln N >= 0 and ln(1/δ_s) > 0).
    """
    loss_clip = _checks.positive("loss_clip", loss_clip)
    n = _checks.count("n", n)
    n_points = _checks.count("n_points", n_points)
    delta_t = _checks.probability("delta_t", delta_t)
    # -log(δ_s) rather than log(1/δ_s): 1/δ_s overflows for δ_s below ~1e-308, the log does not.
    return loss_clip * math.sqrt((math.log(n_points) - math.log(delta_t)) / (2.0 * n))
