"""The fast paths of issue #7 compute what the slow ones did.

Lock-step (stacked) vs sequential twin training is tested in test_training.py
(``test_stacked_and_sequential_twins_equal_two_plain_sgd_loops``); the closed-form gradient norms
against a naive per-example loop are tested there too, for one hidden layer and classification.
Here: deeper models, regression, chunking, the vmap path for user models, and flushing the store.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hsgd_tune.data.datasets import Dataset, Split
from hsgd_tune.train import twin as training
from hsgd_tune.train.models import ModelSpec, count_parameters
from hsgd_tune.train.twin import (
    TrainSettings,
    _vmap_gradient_norms,
    clipped_gradient_norms,
    initial_model,
    is_linear_relu_stack,
    train_twin,
)

D, K = 5, 3


def make_data(task: str, n: int = 80, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)

    def split() -> Split:
        x = rng.normal(size=(n, D)).astype(np.float32)
        y = x[:, :K].argmax(1).astype(np.int64) if task == "classification" else x.sum(1).astype(np.float32)
        return Split(x, y)

    return Dataset(split(), split(), split(), None, task, D, K if task == "classification" else 1, "test")


def random_trajectories(model: nn.Module, n_points: int = 5, seed: int = 0) -> np.ndarray:
    """(2, N, p) iterates at growing scales, so some losses exceed the clip and some do not."""
    p = count_parameters(model)
    scales = np.geomspace(0.3, 6.0, n_points)[None, :, None]
    return (np.random.default_rng(seed).normal(size=(2, n_points, p)) * scales).astype(np.float32)


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("widths", [(), (7,), (6, 4, 5)])
def test_closed_form_equals_vmap_grad(task, widths):
    data = make_data(task)
    spec = ModelSpec("mlp" if widths else "linear", D, data.n_outputs, widths=widths)
    model = initial_model(spec, seed=0)
    assert is_linear_relu_stack(model)
    traj = random_trajectories(model)
    loss_clip = 2.0 if task == "classification" else 20.0
    fast = clipped_gradient_norms(model, traj, data, loss_clip, 16, seed=1)
    slow = _vmap_gradient_norms(model, traj, data, loss_clip, 16, seed=1)
    assert fast.shape == slow.shape == (2, 5, 16)
    assert 0 < np.mean(slow == 0) < 1, "the case must mix clipped and unclipped examples"
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)


def test_chunked_closed_form_equals_one_chunk(monkeypatch):
    data = make_data("classification")
    model = initial_model(ModelSpec("mlp", D, K, widths=(6, 6)), seed=0)
    traj = random_trajectories(model, n_points=7)
    whole = clipped_gradient_norms(model, traj, data, 2.0, 16, seed=1)
    monkeypatch.setattr(training, "_CHUNK_ELEMENTS", 1)  # one model per chunk
    np.testing.assert_array_equal(clipped_gradient_norms(model, traj, data, 2.0, 16, seed=1), whole)


def test_user_models_outside_linear_relu_stacks_take_the_vmap_path():
    data = make_data("classification")
    model = nn.Sequential(nn.Linear(D, 4), nn.LayerNorm(4), nn.Linear(4, K))  # no grouping plan
    assert not is_linear_relu_stack(model)
    assert not is_linear_relu_stack(nn.Sequential(nn.Linear(D, 4, bias=False)))
    traj = random_trajectories(model)
    got = clipped_gradient_norms(model, traj, data, 2.0, 8, seed=1)  # vmap over iterates too
    np.testing.assert_allclose(
        got, _vmap_gradient_norms(model, traj, data, 2.0, 8, seed=1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize(
    "layers",
    [
        lambda k: [nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, k)],  # tanh MLP
        lambda k: [nn.Flatten(), nn.Linear(D, 6, bias=False), nn.GELU(), nn.Linear(6, k)],  # no bias
        lambda k: [nn.Tanh(), nn.Linear(D, 5), nn.SiLU(), nn.Linear(5, k, bias=False), nn.Identity()],
    ],
)
def test_closed_form_for_user_sequentials_of_linear_layers_equals_vmap_grad(task, layers, monkeypatch):
    """Sequentials of Linear layers and elementwise activations take the closed form
    (plan_gradient_norms), in one chunk or in many, and it equals per-iterate vmap(grad)."""
    data = make_data(task)
    torch.manual_seed(0)
    model = nn.Sequential(*layers(data.n_outputs))
    assert not is_linear_relu_stack(model)
    traj = random_trajectories(model)
    loss_clip = 2.0 if task == "classification" else 20.0
    slow = _vmap_gradient_norms(model, traj, data, loss_clip, 16, seed=1)
    assert 0 < np.mean(slow == 0) < 1, "the case must mix clipped and unclipped examples"
    called = []
    monkeypatch.setattr(training, "batched_gradient_norms", lambda *a: called.append(a))  # not taken
    fast = clipped_gradient_norms(model, traj, data, loss_clip, 16, seed=1)
    assert not called
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(training, "_CHUNK_ELEMENTS", 1)  # one model per chunk
    np.testing.assert_allclose(
        clipped_gradient_norms(model, traj, data, loss_clip, 16, seed=1), fast, rtol=1e-6
    )


def test_store_flushed_in_chunks_records_what_one_flush_records(monkeypatch):
    data = make_data("classification")
    spec = ModelSpec("mlp", D, K, widths=(8,))
    settings = TrainSettings(
        learning_rate=0.1, batch_size=8, steps=40, record_every=5, seed=2, lipschitz_subsample=8
    )
    once = train_twin(data, spec, settings)
    p = count_parameters(initial_model(spec, 2))
    monkeypatch.setattr(training, "_PENDING_BYTES", 3 * 2 * 4 * p)  # flush every 3 records
    chunked = train_twin(data, spec, settings)
    np.testing.assert_array_equal(chunked.trajectories, once.trajectories)
    np.testing.assert_allclose(chunked.grad_norms, once.grad_norms, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(once.last_iterates, once.trajectories[:, -1])
    torch.testing.assert_close(
        torch.cat([q.reshape(-1) for q in once.model.parameters()]),
        torch.from_numpy(once.trajectories[0, -1]),
    )
