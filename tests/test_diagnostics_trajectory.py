"""Risks along both trajectories and L_pop (hsgd_tune.certify.diagnostics, issue #17): the stacked pass over
many weight vectors equals a naive loop that loads each vector into the module and calls it, for the
built-in MLP and CNN, user Sequentials (convolutions with stride, dilation, "same" padding, average
pooling, tanh) and a model without a grouping plan (vmap); and the trajectory bound's L_pop is the
max of the mean-gradient norms over the same segment points as a point-by-point computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hsgd_tune import bound
from hsgd_tune.certify.diagnostics import (
    SEGMENT_POINTS,
    FlatModel,
    iterate_errors,
    iterate_risks,
    mean_gradient_norms,
    trajectory_measures,
)
from hsgd_tune.data.datasets import Dataset, Split
from hsgd_tune.train.models import ModelSpec, build_model, flat_parameters, load_flat_parameters
from hsgd_tune.train.twin import H_RUN, S_RUN, TrainSettings, grouping_plan, per_example_loss, train_twin

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMAGE = (2, 6, 6)
D, K = 72, 3


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "mlp": build_model(ModelSpec("mlp", D, K, widths=(16, 8))),
        "cnn": build_model(ModelSpec("cnn", D, K, channels=(3, 4), image_shape=IMAGE, kernel_size=3)),
        "tanh": nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, K)),
        "flatten first": nn.Sequential(nn.Flatten(), nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, K)),
        "conv variants": nn.Sequential(
            nn.Unflatten(1, IMAGE),
            nn.Conv2d(2, 3, 3, padding="same", dilation=2),
            nn.GELU(),
            nn.Conv2d(3, 4, 2, stride=2, bias=False),
            nn.AvgPool2d(3, stride=1, padding=1),
            nn.Flatten(),
            nn.Linear(36, K),
        ),
        "no plan (vmap)": nn.Sequential(nn.Linear(D, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, K)),
    }


def points_near(model: nn.Module, m: int, scale: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(1)
    w = flat_parameters(model).numpy()
    return np.stack([w + scale * rng.normal(size=w.shape) for _ in range(m)]).astype(np.float32)


def data_xy(n: int = 50, task: str = "classification"):
    rng = np.random.default_rng(2)
    x = torch.as_tensor(rng.normal(size=(n, D)).astype(np.float32))
    y = x[:, :K].argmax(dim=1) if task == "classification" else x[:, 0] + 0.1 * x[:, 1]
    return x, y


def naive(model: nn.Module, w: np.ndarray, x, y, task: str, clip: float):
    """Risk, bounded error and ‖∇ mean ℓ_B‖ of ``model`` with the weights w, one module call."""
    module = load_flat_parameters(copy.deepcopy(model), torch.as_tensor(w))
    out = module(x)
    loss = per_example_loss(out, y, task)
    clipped = loss.clamp(max=clip)
    grads = torch.autograd.grad(clipped.mean(), list(module.parameters()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    error = (out.argmax(-1) != y).double() if task == "classification" else clipped.double() / clip
    return float(clipped.mean().detach()), float(error.mean().detach()), float(norm)


@pytest.mark.parametrize("name", list(models()))
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_stacked_risks_errors_and_gradient_norms_equal_a_loop_over_modules(name, task):
    model = models()[name]
    if task == "regression":  # one output
        last = model[-1]
        model[-1] = nn.Linear(last.in_features, 1)
    assert (grouping_plan(model) is None) == (name == "no plan (vmap)")
    fm = FlatModel(model, task)
    x, y = data_xy(task=task)
    points = points_near(model, 7)
    clip = 1.0  # low enough that some examples are clipped (zero gradient there)
    risks = iterate_risks(fm, points, x, y, clip, chunk=3)
    errors = iterate_errors(fm, points, x, y, clip, chunk=3)
    norms = mean_gradient_norms(fm, points, x, y, clip, chunk=3)
    expected = np.array([naive(model, w, x, y, task, clip) for w in points])
    np.testing.assert_allclose(risks, expected[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(errors, expected[:, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norms, expected[:, 2], rtol=1e-4, atol=1e-6)
    assert norms.min() > 0 and len(set(np.round(norms, 6))) == len(norms)  # not all the same point


def make_data(n: int = 80, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)

    def split(k: int) -> Split:
        x = rng.normal(size=(k, D)).astype(np.float32)
        return Split(x, x[:, :K].argmax(axis=1).astype(np.int64))

    return Dataset(split(n), split(n), split(60), None, "classification", D, K, "test")


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_lipschitz_pop_is_the_max_over_every_segment_point_computed_one_by_one(kind):
    """L_pop: for each S-iterate, its nearest H-iterate and every t of SEGMENT_POINTS, the norm of the
    mean gradient of ℓ_B on V, computed point by point with the module; the risks on S likewise."""
    spec = (
        ModelSpec("cnn", D, K, channels=(3,), image_shape=IMAGE, kernel_size=3)
        if kind == "cnn"
        else ModelSpec("mlp", D, K, widths=(8,))
    )
    data = make_data()
    s = TrainSettings(learning_rate=0.3, batch_size=8, steps=40, record_every=8, seed=1)
    run = train_twin(data, spec, s)
    clip = 5.0
    got = trajectory_measures(data, run, clip)
    traj_s, traj_h = (run.trajectories[r].astype(np.float64) for r in (S_RUN, H_RUN))
    nearest, _ = bound.nearest_points(traj_s, traj_h)
    xv, yv = torch.as_tensor(data.val.x), torch.as_tensor(data.val.y)
    xs, ys = torch.as_tensor(data.train.x), torch.as_tensor(data.train.y)
    segment = [traj_h[j] + t * (traj_s[k] - traj_h[j]) for k, j in enumerate(nearest) for t in SEGMENT_POINTS]
    norms = [naive(run.model, w.astype(np.float32), xv, yv, data.task, clip)[2] for w in segment]
    assert got.lipschitz_pop == pytest.approx(max(norms), rel=1e-4)
    risks_s = [naive(run.model, w.astype(np.float32), xs, ys, data.task, clip)[0] for w in traj_s]
    risks_h = [naive(run.model, w.astype(np.float32), xs, ys, data.task, clip)[0] for w in traj_h]
    np.testing.assert_allclose(got.risks_s, risks_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.risks_h, risks_h, rtol=1e-5, atol=1e-6)
