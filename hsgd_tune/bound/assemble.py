"""The trajectory bound of one trial, assembled from its terms (DESIGN.md §2).

``G = C + 2·L̂·D`` bounds ``sup_k [R_B(w^S_k) - R̂_{S,B}(w^S_k)]`` over the recorded S-run iterates
(Dupuis & Viallard, arXiv 2312.00427, decoupling lemma): for the 2L-Lipschitz gap ``g``,
``sup_{W^S} g <= sup_{W^H} g + 2L·d_H(W^S, W^H)``, and ``sup_{W^H} g <= C`` by Hoeffding + a union
bound over the N reference iterates. The risk bound applies G at the last iterate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hsgd_tune.bound import _checks
from hsgd_tune.bound.complexity import complexity_term, trial_delta
from hsgd_tune.bound.distance import hausdorff_distance, synchronous_distance
from hsgd_tune.bound.lipschitz import lipschitz_estimate

# What each logged number rests on; the tracker tags runs with these so that a bound resting on L̂
# is never presented as certified (DESIGN.md §2).
_ASSUMPTIONS = {
    "decoupling_distance": "measured: Hausdorff distance between the recorded S-run and H-run iterates",
    "synchronous_distance": "measured: max distance between same-step iterates (>= decoupling_distance)",
    "lipschitz": "estimated: max per-example gradient norm on a subsample; not certified",
    "complexity": (
        "exact: Hoeffding + union bound over N reference iterates independent of S, δ_t = δ/max_trials"
    ),
    "gap_bound": "holds if L̂ ≥ L (rests on the Lipschitz estimate)",
    "train_risk_clipped": "measured: empirical risk on S of the loss clipped at B, last iterate",
    "risk_bound": "as gap_bound; on the loss clipped at B",
    "loss_clip": "given: clip level B of the loss",
    "delta_trial": "given: δ/max_trials",
    "n_points": "counted: number of recorded reference iterates N",
}


@dataclass(frozen=True)
class TrajectoryBound:
    """Every term of one trial's trajectory bound (DESIGN.md §2 table). Build with
    ``trajectory_bound``; the fields are not re-validated here."""

    decoupling_distance: float  # D = d_H(W^S, W^H)
    synchronous_distance: float  # D_sync = max_k |w^S_k - w^H_k| >= D
    lipschitz: float  # L̂, estimated
    complexity: float  # C = B·sqrt((ln N + ln(1/δ_t)) / (2n))
    gap_bound: float  # G = C + 2·L̂·D
    train_risk_clipped: float  # R̂_{S,B}(w^S_last)
    risk_bound: float  # R̂_{S,B}(w^S_last) + G
    loss_clip: float  # B
    delta: float  # δ, the study's confidence level
    delta_trial: float  # δ_t = δ / max_trials
    n_train: int  # n = |S|
    n_points: int  # N, recorded reference iterates

    @property
    def risk_bound_vacuous(self) -> bool:
        """True when the risk bound exceeds B: the clipped risk is <= B anyway, so it says nothing."""
        return self.risk_bound > self.loss_clip

    def metrics(self) -> dict[str, float]:
        """The loggable numbers, namespaced ``bound/…`` (DESIGN.md §3); all finite floats."""
        names = (
            "decoupling_distance",
            "synchronous_distance",
            "lipschitz",
            "complexity",
            "gap_bound",
            "train_risk_clipped",
            "risk_bound",
            "loss_clip",
            "delta_trial",
            "n_points",
        )
        return {f"bound/{name}": float(getattr(self, name)) for name in names}

    def assumptions(self) -> dict[str, str]:
        """Term name (as in ``metrics()`` without ``bound/``) -> what its value rests on."""
        return dict(_ASSUMPTIONS)


def trajectory_bound(
    traj_s: np.ndarray,
    traj_h: np.ndarray,
    grad_norms: np.ndarray,
    train_risk_clipped: float,
    n_train: int,
    loss_clip: float,
    delta: float,
    max_trials: int,
) -> TrajectoryBound:
    """Assemble the trajectory bound of one trial (DESIGN.md §2; arXiv 2312.00427).

    Args:
        traj_s: (N, p) iterates of the S-run at the recorded steps (every r steps and the last).
        traj_h: (N, p) iterates of the H-run at the same steps; N is the number of recorded
            reference iterates.
        grad_norms: any shape, e.g. (2, N, m), per-example gradient norms of ``ℓ_B`` (see
            ``lipschitz_estimate``).
        train_risk_clipped: ``R̂_{S,B}(w^S_last)``, in [0, B].
        n_train: n = |S| >= 1.
        loss_clip: B > 0.
        delta: the study's confidence level δ in (0, 1).
        max_trials: the study's maximum number of trials, >= 1.

    Returns:
        A ``TrajectoryBound``; with probability >= 1 - δ over S (jointly over all trials), and if
        ``L̂ >= L``, ``R_B(w^S_k) <= R̂_{S,B}(w^S_k) + G`` at every recorded step k.
    """
    traj_s = _checks.point_set("traj_s", traj_s)
    traj_h = _checks.point_set("traj_h", traj_h)
    if traj_s.shape != traj_h.shape:
        raise ValueError(
            "traj_s and traj_h must have the same shape (N, p) (same recorded steps), "
            f"got {traj_s.shape!r} and {traj_h.shape!r}"
        )
    loss_clip = _checks.positive("loss_clip", loss_clip)
    train_risk_clipped = _checks.real("train_risk_clipped", train_risk_clipped)
    if not 0.0 <= train_risk_clipped <= loss_clip:
        raise ValueError(
            f"train_risk_clipped must be in [0, loss_clip={loss_clip!r}], got {train_risk_clipped!r}"
        )
    n_train = _checks.count("n_train", n_train)
    delta_t = trial_delta(delta, max_trials)
    n_points = traj_h.shape[0]

    distance = hausdorff_distance(traj_s, traj_h)
    lipschitz = lipschitz_estimate(grad_norms)
    complexity = complexity_term(loss_clip, n_train, n_points, delta_t)
    gap = complexity + 2.0 * lipschitz * distance  # decoupling lemma: g is 2L-Lipschitz
    return TrajectoryBound(
        decoupling_distance=distance,
        synchronous_distance=synchronous_distance(traj_s, traj_h),
        lipschitz=lipschitz,
        complexity=complexity,
        gap_bound=gap,
        train_risk_clipped=train_risk_clipped,
        risk_bound=train_risk_clipped + gap,
        loss_clip=loss_clip,
        delta=float(delta),
        delta_trial=delta_t,
        n_train=n_train,
        n_points=n_points,
    )
