"""The trajectory bound of one trial, assembled from its terms (DESIGN.md §2).

For a recorded S-iterate ``w = w^S_k`` and its nearest reference iterate ``v = w^H_{j(k)}``,

    R(w) − R̂_S(w) = [R(w) − R(v)] + [R(v) − R̂_S(v)] + [R̂_S(v) − R̂_S(w)]

(on the loss clipped at B). The middle term is at most C for every v in the finite set W^H at once
(Hoeffding + a union bound; W^H does not depend on S), the last is computed exactly on S, and the first
is at most ``L_pop·‖w − v‖``, ``L_pop`` a bound on the norm of the mean gradient of ℓ_B — the gradient
of the population risk — along the segment [v, w] (mean value theorem). So

    g_k = C + (R̂_S(w^H_{j(k)}) − R̂_S(w^S_k)) + L_pop·‖w^S_k − w^H_{j(k)}‖,   G = max_k g_k,

and the risk bound at step k is ``R̂_S(w^S_k) + g_k``. ``L_pop`` is estimated on data independent of S,
so G is *estimated* (Dupuis & Viallard, arXiv 2312.00427, decoupling lemma, with the population-risk
Lipschitz constant in place of a per-example one).

The uniform form ``C + 2·L̂·D`` (D the one-way distance, L̂ the largest per-example gradient norm on a
subsample) is kept for comparison as ``gap_bound_uniform``: it needs g = R − R̂_S to be 2L-Lipschitz
everywhere, and L̂ is 100× the constant the argument above needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hsgd_tune.bound import _checks
from hsgd_tune.bound.complexity import complexity_term
from hsgd_tune.bound.distance import hausdorff_distance, nearest_points, synchronous_distance
from hsgd_tune.bound.lipschitz import lipschitz_estimate

# What each logged number rests on; the tracker tags runs with these so that a bound resting on an
# estimate is never presented as certified (DESIGN.md §2).
_ASSUMPTIONS = {
    "decoupling_distance": "measured: one-way distance, each recorded S-iterate to its nearest H-iterate",
    "hausdorff_distance": "measured: symmetric Hausdorff distance between the recorded iterates (>= D)",
    "synchronous_distance": "measured: max distance between same-step iterates (>= decoupling_distance)",
    "lipschitz": "estimated: max per-example gradient norm on a subsample; not certified",
    "lipschitz_pop": (
        "estimated: largest norm of the mean gradient of the clipped loss on V (independent of S) at "
        "both ends and the middle of each segment [w^H_j(k), w^S_k]; the population-risk constant G needs"
    ),
    "complexity": (
        "exact: Hoeffding + union bound over N reference iterates independent of S, with this "
        "configuration's trajectory share of δ_λ = δ·π(λ) (union over the configuration grid)"
    ),
    "gap_bound": (
        "estimated: max_k [C + R̂_S(w^H_j(k)) − R̂_S(w^S_k) + L_pop·|w^S_k − w^H_j(k)|] over the trajectory; "
        "holds if L_pop bounds the population risk's gradient along the segments"
    ),
    "risk_bound": "as gap_bound; R̂_S + g at the last step, on the loss clipped at B; about the S-model",
    "risk_bound_max": "as gap_bound; the largest R̂_S + g over the recorded steps (the whole trajectory)",
    "gap_bound_uniform": "holds if L̂ ≥ L (rests on the per-example Lipschitz estimate): C + 2·L̂·D",
    "risk_bound_uniform": "as gap_bound_uniform; on the loss clipped at B",
    "train_risk_clipped": "measured: empirical risk on S of the loss clipped at B, last iterate",
    "reference_train_risk": "measured: R̂_S,B of the H-iterate nearest to the last S-iterate",
    "loss_clip": "given: clip level B of the loss",
    "delta_trajectory": "given: this configuration's share of δ_λ = δ·π(λ) for the trajectory bounds",
    "n_points": "counted: number of recorded reference iterates N",
}

#: Used when the iterates were not kept (JL sketches): the risks at recorded iterates need the weights.
_UNIFORM_ONLY = {
    "gap_bound": "as gap_bound_uniform: the iterates were sketched, so the risks at recorded iterates "
    "(and L_pop) that the tighter bound needs could not be computed",
    "risk_bound": "as gap_bound_uniform; on the loss clipped at B",
    "risk_bound_max": "as gap_bound_uniform; on the loss clipped at B",
}


#: The fields of :class:`TrajectoryBound` that a trial logs (``bound/<name>``), and those that are NaN,
#: so not logged, when only the uniform form could be computed.
_LOGGED = (
    "decoupling_distance",
    "hausdorff_distance",
    "synchronous_distance",
    "lipschitz",
    "lipschitz_pop",
    "complexity",
    "gap_bound",
    "risk_bound",
    "risk_bound_max",
    "gap_bound_uniform",
    "risk_bound_uniform",
    "train_risk_clipped",
    "reference_train_risk",
    "loss_clip",
    "n_points",
)
_NAN_WHEN_UNIFORM = ("lipschitz_pop", "reference_train_risk")


@dataclass(frozen=True)
class TrajectoryBound:
    """Every term of one trial's trajectory bound (DESIGN.md §2 table). Build with
    ``trajectory_bound``; the fields are not re-validated here."""

    decoupling_distance: float  # D = max_k min_j |w^S_k - w^H_j|, one-way
    hausdorff_distance: float  # symmetric, >= D
    synchronous_distance: float  # D_sync = max_k |w^S_k - w^H_k| >= D
    lipschitz: float  # L̂, per-example, estimated
    lipschitz_pop: float  # L_pop, mean gradient, estimated (nan when not computed)
    complexity: float  # C = B·sqrt((ln N + ln(1/δ_s)) / (2n))
    gap_bound: float  # G = max_k g_k
    risk_bound: float  # R̂_{S,B}(w^S_last) + g_last
    risk_bound_max: float  # max_k R̂_{S,B}(w^S_k) + g_k
    gap_bound_uniform: float  # C + 2·L̂·D
    risk_bound_uniform: float  # R̂_{S,B}(w^S_last) + C + 2·L̂·D
    train_risk_clipped: float  # R̂_{S,B}(w^S_last)
    reference_train_risk: float  # R̂_{S,B}(w^H_{j(last)})
    loss_clip: float  # B
    delta: float  # δ_s, the confidence of this statement (a share of δ_λ)
    n_train: int  # n = |S|
    n_points: int  # N, recorded reference iterates
    uniform_only: bool = False  # True: the risks at recorded iterates were not available

    @property
    def risk_bound_vacuous(self) -> bool:
        """True when the risk bound exceeds B: the clipped risk is <= B anyway, so it says nothing."""
        return self.risk_bound > self.loss_clip

    def metrics(self) -> dict[str, float]:
        """The loggable numbers, namespaced ``bound/…`` (DESIGN.md §3); all finite floats."""
        values = {f"bound/{name}": float(getattr(self, name)) for name in _LOGGED}
        return {k: v for k, v in values.items() if np.isfinite(v)}  # NaN is never logged

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float], delta: float, n_train: int) -> TrajectoryBound | None:
        """The bound whose :meth:`metrics` these are (a trial's logged run), with the confidence and
        n that are not logged; None when a term is missing (a run logged by an older version).
        The numbers are the logged float64s, so they equal what :func:`trajectory_bound` computed."""
        uniform_only = "bound/lipschitz_pop" not in metrics  # NaN when the iterates were sketched
        values: dict[str, float] = {}
        for name in _LOGGED:
            if f"bound/{name}" in metrics:
                values[name] = float(metrics[f"bound/{name}"])
            elif uniform_only and name in _NAN_WHEN_UNIFORM:
                values[name] = float("nan")
            else:
                return None
        n_points = int(values.pop("n_points"))
        return cls(**values, n_points=n_points, delta=delta, n_train=n_train, uniform_only=uniform_only)

    def assumptions(self) -> dict[str, str]:
        """Term name (as in ``metrics()`` without ``bound/``) -> what its value rests on."""
        return {**_ASSUMPTIONS, **(_UNIFORM_ONLY if self.uniform_only else {})}


def trajectory_gaps(
    risks_s: np.ndarray,
    risks_h: np.ndarray,
    nearest: np.ndarray,
    distances: np.ndarray,
    lipschitz_pop: float,
    complexity: float,
) -> np.ndarray:
    """(N,) ``g_k = C + (R̂_S(w^H_{j(k)}) − R̂_S(w^S_k)) + L_pop·d_k`` (DESIGN.md §2, gap bound G).

    Args:
        risks_s: (N,) ``R̂_{S,B}(w^S_k)`` at the recorded S-iterates.
        risks_h: (M,) ``R̂_{S,B}(w^H_j)`` at the recorded H-iterates.
        nearest: (N,) j(k), the index of the H-iterate paired with ``w^S_k``.
        distances: (N,) ``‖w^S_k − w^H_{j(k)}‖``.
        lipschitz_pop: L_pop >= 0.
        complexity: C >= 0.
    """
    risks_s = _checks.finite_array("risks_s", risks_s).ravel()
    risks_h = _checks.finite_array("risks_h", risks_h).ravel()
    distances = _checks.finite_array("distances", distances).ravel()
    nearest = np.asarray(nearest, dtype=np.int64).ravel()
    if not risks_s.shape == nearest.shape == distances.shape:
        raise ValueError(
            "risks_s, nearest and distances must have one entry per S-iterate, got shapes "
            f"{risks_s.shape!r}, {nearest.shape!r}, {distances.shape!r}"
        )
    if np.any((nearest < 0) | (nearest >= risks_h.size)):
        raise ValueError(f"nearest must index risks_h (size {risks_h.size}), got {nearest.tolist()!r}")
    lipschitz_pop = _checks.real("lipschitz_pop", lipschitz_pop)
    if lipschitz_pop < 0:
        raise ValueError(f"lipschitz_pop must be >= 0, got {lipschitz_pop!r}")
    return complexity + (risks_h[nearest] - risks_s) + lipschitz_pop * distances


def trajectory_bound(
    traj_s: np.ndarray,
    traj_h: np.ndarray,
    grad_norms: np.ndarray,
    train_risk_clipped: float,
    n_train: int,
    loss_clip: float,
    delta: float,
    risks_s: np.ndarray | None = None,
    risks_h: np.ndarray | None = None,
    lipschitz_pop: float | None = None,
) -> TrajectoryBound:
    """Assemble the trajectory bound of one trial (DESIGN.md §2; arXiv 2312.00427).

    Args:
        traj_s: (N, p) iterates of the S-run at the recorded steps (every r steps and the last).
        traj_h: (N, p) iterates of the H-run at the same steps; N is the number of recorded
            reference iterates.
        grad_norms: any shape, e.g. (2, N, m), per-example gradient norms of ``ℓ_B`` (see
            ``lipschitz_estimate``), for the uniform form.
        train_risk_clipped: ``R̂_{S,B}(w^S_last)``, in [0, B].
        n_train: n = |S| >= 1.
        loss_clip: B > 0.
        delta: this statement's confidence, the trajectory share of ``δ_λ = δ·π(λ)``, in (0, 1).
        risks_s: (N,) ``R̂_{S,B}(w^S_k)``; risks_h: (N,) ``R̂_{S,B}(w^H_j)``; lipschitz_pop: L_pop.
            Without them (sketched iterates) G and the risk bounds take the uniform form.

    Returns:
        A ``TrajectoryBound``; with probability >= 1 − δ over S, and if L_pop bounds the population
        risk's gradient along the segments, ``R_B(w^S_k) <= R̂_{S,B}(w^S_k) + g_k`` at every k.
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
    delta = _checks.probability("delta", delta)
    n_points = traj_h.shape[0]

    nearest, distances = nearest_points(traj_s, traj_h)
    distance = float(np.max(distances))
    lipschitz = lipschitz_estimate(grad_norms)
    complexity = complexity_term(loss_clip, n_train, n_points, delta)
    uniform = complexity + 2.0 * lipschitz * distance  # decoupling lemma: g is 2L-Lipschitz
    uniform_only = risks_s is None or risks_h is None or lipschitz_pop is None
    if uniform_only:
        gap, risk = uniform, train_risk_clipped + uniform
        risk_max, reference_risk, lipschitz_pop = risk, float("nan"), float("nan")
    else:
        gaps = trajectory_gaps(risks_s, risks_h, nearest, distances, lipschitz_pop, complexity)
        risks_s = np.asarray(risks_s, dtype=np.float64).ravel()
        gap, risk = float(np.max(gaps)), float(risks_s[-1] + gaps[-1])
        risk_max = float(np.max(risks_s + gaps))
        reference_risk = float(np.asarray(risks_h, dtype=np.float64).ravel()[nearest[-1]])
    return TrajectoryBound(
        decoupling_distance=distance,
        hausdorff_distance=hausdorff_distance(traj_s, traj_h),
        synchronous_distance=synchronous_distance(traj_s, traj_h),
        lipschitz=lipschitz,
        lipschitz_pop=float(lipschitz_pop),
        complexity=complexity,
        gap_bound=gap,
        risk_bound=risk,
        risk_bound_max=risk_max,
        gap_bound_uniform=uniform,
        risk_bound_uniform=train_risk_clipped + uniform,
        train_risk_clipped=train_risk_clipped,
        reference_train_risk=reference_risk,
        loss_clip=loss_clip,
        delta=delta,
        n_train=n_train,
        n_points=n_points,
        uniform_only=uniform_only,
    )
