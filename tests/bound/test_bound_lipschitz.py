"""The Lipschitz estimate L̂: the largest recorded per-example gradient norm."""

from __future__ import annotations

import numpy as np
import pytest

from hsgd_tune.bound import lipschitz_estimate


def test_lipschitz_estimate_is_max_over_runs_iterates_and_examples():
    grad_norms = np.random.default_rng(0).uniform(size=(2, 5, 7))  # (run, iterate, example)
    grad_norms[1, 3, 2] = 4.5
    assert lipschitz_estimate(grad_norms) == 4.5


def test_lipschitz_estimate_accepts_any_shape_including_a_list():
    assert lipschitz_estimate([0.5, 2.0, 1.0]) == 2.0


def test_lipschitz_estimate_of_all_zero_gradients_is_zero():
    # e.g. every loss above the clip B: ℓ_B is flat, so its gradient vanishes.
    assert lipschitz_estimate(np.zeros((2, 3, 4))) == 0.0


@pytest.mark.parametrize(
    ("grad_norms", "message"),
    [
        (np.zeros((2, 0, 4)), "grad_norms must be non-empty"),
        (np.array([1.0, np.nan]), "grad_norms must contain only finite values"),
        (np.array([1.0, np.inf]), "grad_norms must contain only finite values"),
        (np.array([1.0, -0.5]), "grad_norms must be >= 0"),
    ],
)
def test_lipschitz_estimate_rejects_bad_input(grad_norms, message):
    with pytest.raises(ValueError, match=message):
        lipschitz_estimate(grad_norms)
