"""The assembled trajectory bound: a hand-computed trial, the naive loop, vacuity, logging contract,
validation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from hsgd_tune.bound import TrajectoryBound, trajectory_bound, trajectory_gaps

# A hand-computable trial, 1-D weights, N = 3 recorded steps:
#   W^S = {0, 1, 2}, W^H = {0, 2, 1.25} (same steps, so w^H_1 = 2 pairs with w^S_1 = 1).
#   Nearest H-iterate of each S-iterate: 0 -> 0 (d 0), 1 -> 1.25 (j = 2, d 0.25), 2 -> 2 (j = 1, d 0)
#   D (one-way) = 0.25; Hausdorff: also H -> S: 1.25 -> 1: 0.25; D_sync = max(0, 1, 0.75) = 1
#   L̂ = max grad norm = 2; L_pop = 1
#   δ = 3·e^-25: ln N + ln 1/δ = ln 3 + 25 - ln 3 = 25;  C = B·sqrt(25 / (2·50)) = B/2
#   B = 4: C = 2.  R̂_S(w^S) = [2, 1, 0.5], R̂_S(w^H) = [2, 0.25, 0.75]
#   g_0 = 2 + (2 - 2) + 0 = 2;  g_1 = 2 + (0.75 - 1) + 0.25 = 2;  g_2 = 2 + (0.25 - 0.5) + 0 = 1.75
#   G = 2; risk bound = 0.5 + 1.75 = 2.25; max_k R̂_S(w^S_k) + g_k = 2 + 2 = 4
#   uniform: C + 2·L̂·D = 2 + 2·2·0.25 = 3, risk bound 3.5
TRAJ_S = np.array([[0.0], [1.0], [2.0]])
TRAJ_H = np.array([[0.0], [2.0], [1.25]])
GRAD_NORMS = np.array([[[0.5, 1.0], [2.0, 0.1], [0.0, 1.5]], [[0.3, 0.3], [1.9, 0.2], [1.0, 1.0]]])
DELTA = 3.0 * math.exp(-25.0)
CASE = {
    "traj_s": TRAJ_S,
    "traj_h": TRAJ_H,
    "grad_norms": GRAD_NORMS,
    "train_risk_clipped": 0.5,
    "n_train": 50,
    "loss_clip": 4.0,
    "delta": DELTA,
    "risks_s": np.array([2.0, 1.0, 0.5]),
    "risks_h": np.array([2.0, 0.25, 0.75]),
    "lipschitz_pop": 1.0,
}

METRIC_KEYS = {
    "bound/decoupling_distance",
    "bound/hausdorff_distance",
    "bound/synchronous_distance",
    "bound/lipschitz",
    "bound/lipschitz_pop",
    "bound/complexity",
    "bound/gap_bound",
    "bound/risk_bound",
    "bound/risk_bound_max",
    "bound/gap_bound_uniform",
    "bound/risk_bound_uniform",
    "bound/train_risk_clipped",
    "bound/reference_train_risk",
    "bound/loss_clip",
    "bound/n_points",
}


def test_hand_computed_trial_gives_every_term():
    result = trajectory_bound(**CASE)
    assert result.decoupling_distance == 0.25
    assert result.hausdorff_distance == 0.25
    assert result.synchronous_distance == 1.0
    assert result.lipschitz == 2.0 and result.lipschitz_pop == 1.0
    assert result.complexity == pytest.approx(2.0, rel=1e-12)
    assert result.gap_bound == pytest.approx(2.0, rel=1e-12)
    assert result.risk_bound == pytest.approx(2.25, rel=1e-12)
    assert result.risk_bound_max == pytest.approx(4.0, rel=1e-12)
    assert result.gap_bound_uniform == pytest.approx(3.0, rel=1e-12)
    assert result.risk_bound_uniform == pytest.approx(3.5, rel=1e-12)
    assert result.train_risk_clipped == 0.5 and result.reference_train_risk == 0.25
    assert result.loss_clip == 4.0 and result.delta == DELTA
    assert (result.n_train, result.n_points) == (50, 3)


def test_gaps_match_a_naive_loop_over_the_recorded_steps():
    rng = np.random.default_rng(3)
    traj_s, traj_h = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    risks_s, risks_h = rng.uniform(0, 2, 12), rng.uniform(0, 2, 12)
    l_pop, c = 0.7, 0.4
    expected = []
    for k in range(12):
        dists = [np.linalg.norm(traj_s[k] - traj_h[j]) for j in range(12)]
        j = int(np.argmin(dists))
        expected.append(c + risks_h[j] - risks_s[k] + l_pop * dists[j])
    result = trajectory_bound(
        traj_s, traj_h, np.ones(3), float(risks_s[-1]), 100, 2.0, 0.01, risks_s, risks_h, l_pop
    )
    assert result.gap_bound == pytest.approx(max(expected) - c + result.complexity, rel=1e-12)
    from hsgd_tune.bound import nearest_points

    j, d = nearest_points(traj_s, traj_h)
    np.testing.assert_allclose(trajectory_gaps(risks_s, risks_h, j, d, l_pop, c), expected, rtol=1e-12)


def test_without_risks_at_the_iterates_the_bound_takes_the_uniform_form_and_says_so():
    result = trajectory_bound(**{**CASE, "risks_s": None, "risks_h": None, "lipschitz_pop": None})
    assert result.gap_bound == result.gap_bound_uniform == pytest.approx(3.0, rel=1e-12)
    assert result.risk_bound == pytest.approx(3.5, rel=1e-12)
    assert "bound/lipschitz_pop" not in result.metrics()  # NaN is never logged
    assert "sketched" in result.assumptions()["gap_bound"]


def test_risk_bound_below_loss_clip_is_not_vacuous():
    assert not trajectory_bound(**CASE).risk_bound_vacuous


def test_risk_bound_above_loss_clip_is_flagged_vacuous():
    result = trajectory_bound(**{**CASE, "loss_clip": 2.0})  # C = 1, g_2 = 0.75: risk bound 1.25 < 2
    assert result.risk_bound == pytest.approx(0.5 + 1.0 + (0.25 - 0.5), rel=1e-12)
    big = trajectory_bound(**{**CASE, "loss_clip": 2.0, "lipschitz_pop": 10.0, "traj_s": TRAJ_S + 0.5})
    assert big.risk_bound > 2.0 and big.risk_bound_vacuous


def test_metrics_have_exactly_the_namespaced_keys():
    assert set(trajectory_bound(**CASE).metrics()) == METRIC_KEYS


def test_metrics_are_all_finite_floats():
    values = trajectory_bound(**CASE).metrics().values()
    assert all(type(v) is float and math.isfinite(v) for v in values)


def _same(a: TrajectoryBound, b: TrajectoryBound) -> bool:
    """Field by field, NaN equal to NaN."""
    return all(
        x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
        for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b), strict=True)
    )


@pytest.mark.parametrize("uniform", [False, True])
def test_a_logged_bound_is_rebuilt_from_its_metrics(uniform):
    """What certification reads back instead of recomputing L_pop: every field, exactly."""
    case = {**CASE, "risks_s": None, "risks_h": None, "lipschitz_pop": None} if uniform else CASE
    result = trajectory_bound(**case)
    rebuilt = TrajectoryBound.from_metrics(result.metrics(), DELTA, 50)
    assert rebuilt is not None and rebuilt.uniform_only == uniform
    assert _same(rebuilt, result) and type(rebuilt.n_points) is int


def test_a_bound_missing_a_logged_term_is_not_rebuilt():
    metrics = trajectory_bound(**CASE).metrics()
    del metrics["bound/complexity"]
    assert TrajectoryBound.from_metrics(metrics, DELTA, 50) is None
    metrics = trajectory_bound(**CASE).metrics()
    del metrics["bound/reference_train_risk"]  # only NaN (unlogged) when L_pop is missing too
    assert TrajectoryBound.from_metrics(metrics, DELTA, 50) is None


def test_assumptions_name_the_status_of_every_metric():
    assumptions = trajectory_bound(**CASE).assumptions()
    assert {f"bound/{name}" for name in assumptions} >= METRIC_KEYS


def test_assumptions_never_call_the_estimated_terms_certified():
    assumptions = trajectory_bound(**CASE).assumptions()
    assert "not certified" in assumptions["lipschitz"]
    assert assumptions["lipschitz_pop"].startswith("estimated")
    assert assumptions["gap_bound"].startswith("estimated")
    assert assumptions["gap_bound_uniform"].startswith("holds if L̂ ≥ L")
    assert assumptions["risk_bound"].startswith("as gap_bound")
    assert not any("certified:" in text for text in assumptions.values())


def test_trajectory_bound_is_frozen():
    result = trajectory_bound(**CASE)
    assert isinstance(result, TrajectoryBound)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.risk_bound = 0.0  # type: ignore[misc]


def test_identical_trajectories_leave_only_the_complexity():
    same = {**CASE, "traj_h": TRAJ_S, "risks_h": CASE["risks_s"]}
    result = trajectory_bound(**same)
    assert result.decoupling_distance == 0.0
    assert result.gap_bound == result.gap_bound_uniform == result.complexity


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"traj_h": np.zeros((4, 1))},
            r"traj_s and traj_h must have the same shape \(N, p\)",
        ),
        (
            {"traj_h": np.zeros((3, 2))},
            r"traj_s and traj_h must have the same shape \(N, p\)",
        ),
        ({"traj_s": np.zeros(3)}, r"traj_s must be a 2-D array"),
        ({"traj_h": np.full((3, 1), np.nan)}, "traj_h must contain only finite values"),
        ({"grad_norms": np.array([-1.0])}, "grad_norms must be >= 0"),
        (
            {"train_risk_clipped": -0.1},
            r"train_risk_clipped must be in \[0, loss_clip=4.0\]",
        ),
        (
            {"train_risk_clipped": 4.5},
            r"train_risk_clipped must be in \[0, loss_clip=4.0\]",
        ),
        (
            {"train_risk_clipped": math.nan},
            "train_risk_clipped must be a finite real number",
        ),
        ({"n_train": 0}, "n_train must be an integer >= 1"),
        ({"loss_clip": 0.0}, "loss_clip must be > 0"),
        ({"delta": 1.0}, r"delta must be in the open interval \(0, 1\)"),
        ({"risks_s": np.ones(2)}, "risks_s, nearest and distances must have one entry per S-iterate"),
        ({"lipschitz_pop": -1.0}, "lipschitz_pop must be >= 0"),
    ],
)
def test_trajectory_bound_rejects_bad_input(override, message):
    with pytest.raises(ValueError, match=message):
        trajectory_bound(**{**CASE, **override})
