"""Gradients written out by hand for chain models (hsgd_tune.certify.backprop) against autograd.

The posterior fit, the tail index's minibatch gradients and the analytic bounds' full gradients take
the hand-written path for a chain of Linear and unit-wise layers (the built-in MLP and linear models, a
user's Sequential of them). Each is compared here with the autograd computation it replaces, on models
with every supported activation, a layer without bias, both tasks and both posterior kinds; the
gradient mismatch's one weighted pass of S and H also for models left to autograd (GELU, a CNN).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hsgd_tune.certify import backprop, diagnostics
from hsgd_tune.certify.diagnostics import FlatModel, fit_posterior, full_gradient, gradient_noise
from hsgd_tune.train.models import ModelSpec, build_model, flat_parameters


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """As measure() runs."""


def relu_mlp() -> nn.Module:
    return build_model(ModelSpec(kind="mlp", n_features=6, n_outputs=3, widths=(16, 8)))


def smooth_chain() -> nn.Module:
    """Tanh, a Linear without bias, Sigmoid and Identity: every derivative backprop.py writes out."""
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5, bias=False), nn.Sigmoid(), nn.Identity(), nn.Linear(5, 3)
    )


def linear_regression() -> nn.Module:
    return build_model(ModelSpec(kind="linear", n_features=6, n_outputs=1))


def gelu_chain() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))


def tiny_cnn() -> nn.Module:
    return build_model(ModelSpec("cnn", 16, 3, channels=(2,), image_shape=(1, 4, 4)))


MODELS = {
    "relu-mlp": (relu_mlp, "classification"),
    "tanh-sigmoid": (smooth_chain, "classification"),
    "linear-regression": (linear_regression, "regression"),
    "relu-mlp-regression": (lambda: build_model(ModelSpec("mlp", 6, 1, widths=(8,))), "regression"),
}


#: Models left to autograd: an activation not written out, and a convolution.
OTHERS = {"gelu": (gelu_chain, "classification"), "cnn": (tiny_cnn, "classification")}


def setup(name: str, n: int = 96):
    factory, task = {**MODELS, **OTHERS}[name]
    torch.manual_seed(0)
    fm = FlatModel(factory(), task)
    gen = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(n, 16 if name == "cnn" else 6, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen) if task == "classification" else 3.0 * torch.randn(n)
    return fm, flat_parameters(fm.model).clone(), x, y


def autograd_full_gradient(fm, w, x, y):
    w = w.detach().clone().requires_grad_(True)
    return torch.autograd.grad(fm.loss(w, x, y), w)[0]


@pytest.mark.parametrize("name", MODELS)
def test_every_chain_model_here_takes_the_hand_written_path(name):
    fm, *_ = setup(name)
    assert fm.chain is not None and backprop.supports(fm.chain) and diagnostics._by_hand(fm)


def test_a_chain_with_an_activation_not_written_out_is_left_to_autograd():
    fm, w, x, y = setup("gelu")
    assert fm.chain is not None and not backprop.supports(fm.chain) and not diagnostics._by_hand(fm)
    torch.testing.assert_close(full_gradient(fm, w, x, y), autograd_full_gradient(fm, w, x, y))


@pytest.mark.parametrize("name", MODELS)
def test_the_full_gradient_by_hand_is_autograds(name):
    fm, w, x, y = setup(name)
    got, expected = full_gradient(fm, w, x, y), autograd_full_gradient(fm, w, x, y)
    assert float(expected.abs().max()) > 1e-2  # not a comparison of zeros
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 8, 96])
def test_minibatch_gradients_from_one_pass_are_each_minibatchs_own_gradient(name, batch):
    fm, w, x, y = setup(name)
    noise = gradient_noise(fm, w.double().numpy(), x, y, batch_size=batch, draws=5, seed=3)
    rng = np.random.default_rng(3)  # gradient_noise's draws, one fresh permutation each
    positions = [torch.as_tensor(rng.permutation(len(y))[:batch]) for _ in range(5)]
    full = autograd_full_gradient(fm, w, x, y)
    expected = torch.stack([autograd_full_gradient(fm, w, x[p], y[p]) - full for p in positions])
    np.testing.assert_allclose(noise, expected.double().numpy(), rtol=1e-4, atol=2e-6)


def relaxation_args(fm, w, kind: str, seed: int = 0):
    p = fm.n_params
    gen = torch.Generator().manual_seed(seed)
    groups = fm.group_index() if kind == "layer" else torch.arange(p)
    mean = (w + 0.05 * torch.randn(p, generator=gen)).requires_grad_(True)
    log_std = (math.log(0.05) + 0.3 * torch.randn(int(groups.max()) + 1, generator=gen)).requires_grad_(True)
    return mean, log_std, groups, w.clone(), torch.randn(p, generator=gen)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ["layer", "weight"])
def test_the_relaxed_bounds_gradient_by_hand_is_autograds(name, kind):
    fm, w, x, y = setup(name)
    mean, log_std, groups, prior, noise = relaxation_args(fm, w, kind)
    args = (fm, mean, log_std, groups, prior, noise, x, y, 12.0, 500, 5.0)
    if fm.task == "regression":  # some rows beyond the clip B = 5, where the clipped loss is flat
        residual = fm.forward(mean + torch.exp(log_std)[groups] * noise, x).squeeze(-1) - y
        assert 0 < int((residual**2 > 5.0).sum()) < len(y)
    by_hand = diagnostics._relaxation_by_hand(*args)
    reference = diagnostics._relaxation_by_autograd(*args)
    for got, expected in zip(by_hand, reference, strict=True):
        assert float(expected.abs().max()) > 1e-4
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["layer", "weight"])
def test_the_posterior_fit_by_hand_finds_autograds_posterior(kind, monkeypatch):
    fm, w, x, y = setup("relu-mlp", n=120)
    w_s = w.double().numpy()
    w_h = w_s + 0.05 * np.random.default_rng(1).normal(size=w_s.shape)
    args = dict(kind=kind, steps=120, delta=1e-4, loss_clip=5.0, batch=64, check_every=40, seed=7)
    by_hand = fit_posterior(fm, w_s, w_h, x, y, **args)
    monkeypatch.setattr(diagnostics, "_by_hand", lambda fm: False)
    reference = fit_posterior(fm, w_s, w_h, x, y, **args)
    assert not np.allclose(reference.mean, w_s)  # the fit moved
    np.testing.assert_allclose(by_hand.mean, reference.mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(by_hand.std, reference.std, rtol=1e-4)
    assert by_hand.prior_std == reference.prior_std


@pytest.mark.parametrize("name", [*MODELS, *OTHERS])
def test_the_gradient_mismatch_in_one_pass_of_s_and_h_is_the_difference_of_autograds_gradients(name):
    """By hand for the chain models, through autograd (one weighted pass) for the others."""
    fm, w, x, y = setup(name, n=96)
    _, _, x_h, y_h = setup(name, n=64)  # H: other rows (another draw), another size
    x_h, y_h = x_h + 0.5, y_h.flip(0)
    iterates = torch.stack([w, w + 0.1 * torch.randn(len(w), generator=torch.Generator().manual_seed(2))])
    got = diagnostics.gradient_mismatch(fm, iterates.double().numpy(), (x, y), (x_h, y_h))
    expected = [
        float(
            torch.linalg.vector_norm(
                autograd_full_gradient(fm, v, x, y) - autograd_full_gradient(fm, v, x_h, y_h)
            )
        )
        for v in iterates
    ]
    assert min(expected) > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-5)
