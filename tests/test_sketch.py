"""Tests for hsgd_tune.train.sketch: the JL sketch of recorded iterates and its documented distortion."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_study import TINY_STUDY

from hsgd_tune.bound import hausdorff_distance, synchronous_distance
from hsgd_tune.data.datasets import load_dataset
from hsgd_tune.search.objective import evaluate
from hsgd_tune.studyfile.config import load_study
from hsgd_tune.train import sketch as sketch_module
from hsgd_tune.train.models import ModelSpec
from hsgd_tune.train.sketch import (
    SignSketch,
    dimension_for,
    distortion_epsilon,
    pair_failure_probability,
    sketch_assumptions,
)
from hsgd_tune.train.twin import TrainSettings, train_twin


def cross_ratios(a: np.ndarray, b: np.ndarray, sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """Sketched / true distance for every pair (a_i, b_j): a (N, p), sa (N, k)."""
    true = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    est = np.linalg.norm(sa[:, None, :] - sb[None, :, :], axis=-1)
    same = true == 0  # e.g. both runs at step 0: a linear sketch maps equal points to equal points
    assert np.all(est[same] == 0)
    return est[~same] / true[~same]


def test_apply_equals_the_explicit_sign_matrix_across_blocks(monkeypatch):
    monkeypatch.setattr(sketch_module, "_BLOCK_ELEMENTS", 16 * 24)  # blocks of 24 columns
    sk = SignSketch(n_parameters=100, dim=16, seed=7)
    matrix = sk.matrix()  # (k, p), built column by column from apply(e_j)
    assert sk.block == 24 and matrix.shape == (16, 100)
    # Every entry is ±1/sqrt(k), and both signs occur.
    np.testing.assert_allclose(matrix.abs().numpy(), 1 / math.sqrt(16), rtol=1e-6)
    assert (matrix > 0).any() and (matrix < 0).any()
    x = torch.randn(5, 100, dtype=torch.float64)
    torch.testing.assert_close(sk.apply(x), (x.float() @ matrix.T), rtol=1e-5, atol=1e-5)


def test_same_seed_same_sketch_other_seed_other_sketch():
    x = torch.randn(3, 500)
    a = SignSketch(500, 32, seed=1).apply(x)
    torch.testing.assert_close(a, SignSketch(500, 32, seed=1).apply(x), rtol=0, atol=0)
    assert not torch.allclose(a, SignSketch(500, 32, seed=2).apply(x))


def test_negative_study_seed_is_accepted():
    assert SignSketch(10, 4, seed=-3).apply(torch.ones(1, 10)).shape == (1, 4)


def test_failure_bound_is_achlioptas_formula_in_squared_distortion():
    k, eps = 300, 0.2
    eps2 = eps * (2 - eps)  # (1 - eps)^2 = 1 - eps2
    expected = 2 * math.exp(-(k / 2) * (eps2**2 / 2 - eps2**3 / 3))
    assert pair_failure_probability(k, eps) == pytest.approx(expected, rel=1e-12)


def test_dimension_and_epsilon_are_inverse_and_sharper_than_the_textbook_constant():
    pairs, eta = 41**2, 0.05
    k = dimension_for(0.1, pairs, eta)
    assert k == 1411  # the example quoted in sketch.py's docstring
    assert pairs * pair_failure_probability(k, 0.1) <= eta < pairs * pair_failure_probability(k - 1, 0.1)
    assert 0.0999 < distortion_epsilon(k, pairs, eta) <= 0.1  # k was rounded up, so ε is a hair less
    assert k < 8 * math.log(pairs / eta) / 0.1**2  # the textbook k >= 8 ln(n²/η)/ε², n² = pairs
    assert distortion_epsilon(4, pairs, eta) == 1.0  # too small a sketch promises nothing


def test_single_pair_failure_rate_stays_below_the_bound():
    # Monte Carlo over 400 independent sketches of one vector: a small k, so failures are visible.
    k, eps, p = 24, 0.4, 300
    x = torch.randn(1, p, generator=torch.Generator().manual_seed(0))  # seeded: the count is exact
    ratios = np.array([SignSketch(p, k, seed=s).apply(x).norm().item() / x.norm().item() for s in range(400)])
    failures = np.mean((ratios < 1 - eps) | (ratios > 1 + eps))
    assert 0 < failures <= pair_failure_probability(k, eps)


def test_random_point_sets_keep_all_cross_distances_within_documented_epsilon():
    rng = np.random.default_rng(0)
    n, p, eps, eta = 20, 4000, 0.2, 0.05
    a = rng.normal(size=(n, p))
    b = a + rng.normal(size=(n, p)) * 0.05  # close pairs, as the S- and H-runs are
    k = dimension_for(eps, n * n, eta)
    sk = SignSketch(p, k, seed=0)
    sa, sb = sk.apply(torch.from_numpy(a)).double().numpy(), sk.apply(torch.from_numpy(b)).double().numpy()
    ratios = cross_ratios(a, b, sa, sb)
    assert np.all((1 - eps <= ratios) & (ratios <= 1 + eps)), (ratios.min(), ratios.max())
    d, d_sketch = hausdorff_distance(a, b), hausdorff_distance(sa, sb)
    assert (1 - eps) * d <= d_sketch <= (1 + eps) * d


def test_real_trajectories_keep_bound_distances_within_documented_epsilon():
    """A sketched twin run records exactly the sketch of what an unsketched one records."""
    data = load_dataset(load_study_from_text(TINY_STUDY).data, seed=0)
    spec = ModelSpec("mlp", data.n_features, data.n_outputs, widths=(32,))
    base = dict(learning_rate=0.1, batch_size=16, steps=100, record_every=5, seed=0, lipschitz_subsample=16)
    full = train_twin(data, spec, TrainSettings(**base))
    n_points, p = full.trajectories.shape[1:]
    eps = 0.25
    k = dimension_for(eps, n_points**2, 0.05)
    sketched = train_twin(data, spec, TrainSettings(**base, sketch_above=0, sketch_dim=k))
    assert sketched.trajectories.shape == (2, n_points, k) and sketched.sketch_dim == k
    assert sketched.n_parameters == p == full.n_parameters
    np.testing.assert_array_equal(sketched.grad_norms, full.grad_norms)  # from full iterates
    expected = SignSketch(p, k, seed=0).apply(torch.from_numpy(full.trajectories.reshape(-1, p)))
    np.testing.assert_allclose(sketched.trajectories.reshape(-1, k), expected.numpy(), rtol=1e-4, atol=1e-5)

    s_full, h_full = full.trajectories.astype(np.float64)
    s_sk, h_sk = sketched.trajectories.astype(np.float64)
    ratios = cross_ratios(s_full, h_full, s_sk, h_sk)
    assert np.all((1 - eps <= ratios) & (ratios <= 1 + eps)), (ratios.min(), ratios.max())
    for distance in (hausdorff_distance, synchronous_distance):
        d, d_sketch = distance(s_full, h_full), distance(s_sk, h_sk)
        assert (1 - eps) * d <= d_sketch <= (1 + eps) * d


def test_sketched_trial_is_tagged_as_an_estimate_and_reports_epsilon(tmp_path):
    cfg = load_study_from_text(
        TINY_STUDY.replace("record_every = 20", "record_every = 20\nsketch_above = 1\nsketch_dim = 64")
    )
    data = load_dataset(cfg.data, cfg.seed)
    outcome = evaluate(cfg, data, {"learning_rate": 0.05, "batch_size": 8})
    metrics, tags = outcome.metrics(), outcome.tags()
    assert metrics["bound/sketch_dim"] == 64
    assert metrics["train/trajectory_bytes"] == 2 * outcome.bound.n_points * 64 * 4
    epsilon, expected_tags = sketch_assumptions(64, outcome.bound.n_points)
    assert metrics["bound/sketch_epsilon"] == epsilon
    assert tags["hsgd.assumption.decoupling_distance"].startswith("estimated: Hausdorff distance between JL")
    assert tags["hsgd.assumption.decoupling_distance"] == expected_tags["decoupling_distance"]


def test_small_models_are_not_sketched():
    cfg = load_study_from_text(TINY_STUDY)
    data = load_dataset(cfg.data, cfg.seed)
    outcome = evaluate(cfg, data, {"learning_rate": 0.05, "batch_size": 8})
    metrics = outcome.metrics()
    assert "bound/sketch_dim" not in metrics and outcome.run.sketch_dim == 0
    assert (
        metrics["train/trajectory_bytes"]
        == outcome.run.trajectories.nbytes
        == 2 * 4 * 4 * metrics["train/n_parameters"]
    )
    assert outcome.tags()["hsgd.assumption.decoupling_distance"].startswith("measured")


def load_study_from_text(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.toml"
        path.write_text(text)
        return load_study(path)
