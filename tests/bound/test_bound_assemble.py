"""The assembled trajectory bound: a hand-computed trial, vacuity, logging contract, validation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from hsgd_tune.bound import TrajectoryBound, trajectory_bound

# A hand-computable trial, 1-D weights, N = 3 recorded steps:
#   W^S = {0, 1, 2}, W^H = {0, 2, 1.25} (same steps, so w^H_1 = 2 pairs with w^S_1 = 1).
#   D: S->H: 0->0: 0, 1->1.25: 0.25, 2->2: 0;  H->S: 1.25->1: 0.25      => D = 0.25
#   D_sync = max(|0-0|, |1-2|, |2-1.25|) = 1
#   L̂ = max grad norm = 2
#   δ = 10·3·e^-25, max_trials = 10 => δ_t = 3·e^-25, ln N + ln 1/δ_t = ln 3 + 25 - ln 3 = 25
#   C = B·sqrt(25 / (2·50)) = B/2
#   B = 4: C = 2, G = C + 2·L̂·D = 2 + 2·2·0.25 = 3, risk bound = 0.5 + 3 = 3.5 <= 4.
#   B = 2: C = 1, G = 2, risk bound = 2.5 > 2: vacuous.
TRAJ_S = np.array([[0.0], [1.0], [2.0]])
TRAJ_H = np.array([[0.0], [2.0], [1.25]])
GRAD_NORMS = np.array([[[0.5, 1.0], [2.0, 0.1], [0.0, 1.5]], [[0.3, 0.3], [1.9, 0.2], [1.0, 1.0]]])
DELTA = 30.0 * math.exp(-25.0)
CASE = {
    "traj_s": TRAJ_S,
    "traj_h": TRAJ_H,
    "grad_norms": GRAD_NORMS,
    "train_risk_clipped": 0.5,
    "n_train": 50,
    "loss_clip": 4.0,
    "delta": DELTA,
    "max_trials": 10,
}

METRIC_KEYS = {
    "bound/decoupling_distance",
    "bound/synchronous_distance",
    "bound/lipschitz",
    "bound/complexity",
    "bound/gap_bound",
    "bound/train_risk_clipped",
    "bound/risk_bound",
    "bound/loss_clip",
    "bound/delta_trial",
    "bound/n_points",
}


def test_hand_computed_trial_gives_every_term():
    result = trajectory_bound(**CASE)
    assert result.decoupling_distance == 0.25
    assert result.synchronous_distance == 1.0
    assert result.lipschitz == 2.0
    assert result.complexity == pytest.approx(2.0, rel=1e-12)
    assert result.gap_bound == pytest.approx(3.0, rel=1e-12)
    assert result.train_risk_clipped == 0.5
    assert result.risk_bound == pytest.approx(3.5, rel=1e-12)
    assert result.loss_clip == 4.0
    assert result.delta == DELTA
    assert result.delta_trial == pytest.approx(3.0 * math.exp(-25.0), rel=1e-14)
    assert (result.n_train, result.n_points) == (50, 3)


def test_risk_bound_below_loss_clip_is_not_vacuous():
    assert not trajectory_bound(**CASE).risk_bound_vacuous


def test_risk_bound_above_loss_clip_is_flagged_vacuous():
    result = trajectory_bound(**{**CASE, "loss_clip": 2.0})
    assert result.risk_bound == pytest.approx(2.5, rel=1e-12)
    assert result.risk_bound_vacuous


def test_metrics_have_exactly_the_namespaced_keys():
    assert set(trajectory_bound(**CASE).metrics()) == METRIC_KEYS


def test_metrics_are_all_finite_floats():
    values = trajectory_bound(**CASE).metrics().values()
    assert all(type(v) is float and math.isfinite(v) for v in values)


def test_assumptions_name_the_status_of_every_metric():
    assumptions = trajectory_bound(**CASE).assumptions()
    assert {f"bound/{name}" for name in assumptions} == METRIC_KEYS


def test_assumptions_never_call_the_lipschitz_based_terms_certified():
    assumptions = trajectory_bound(**CASE).assumptions()
    assert "not certified" in assumptions["lipschitz"]
    assert assumptions["gap_bound"].startswith("holds if L̂ ≥ L")
    assert assumptions["risk_bound"].startswith("as gap_bound")


def test_trajectory_bound_is_frozen():
    result = trajectory_bound(**CASE)
    assert isinstance(result, TrajectoryBound)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.risk_bound = 0.0  # type: ignore[misc]


def test_identical_trajectories_leave_only_the_complexity():
    result = trajectory_bound(**{**CASE, "traj_h": TRAJ_S})
    assert result.decoupling_distance == 0.0
    assert result.gap_bound == result.complexity


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
        ({"max_trials": 0}, "max_trials must be an integer >= 1"),
    ],
)
def test_trajectory_bound_rejects_bad_input(override, message):
    with pytest.raises(ValueError, match=message):
        trajectory_bound(**{**CASE, **override})
