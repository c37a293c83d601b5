"""The certificate's faster computations (issue #17) against the naive ones they replace.

* ``FlatModel.forward`` of the built-in MLP and linear models calls ``F.linear`` itself instead of going
  through ``functional_call``: the same outputs, gradients, batched outputs and Hessian-vector products.
* The posterior fit: :class:`diagnostics._Adam` gives, bit for bit, the posterior that
  ``torch.optim.Adam`` and ``functional_call`` gave (the reference below is the code as it was), on
  the autograd path (the chain models' hand-written gradients: tests/test_backprop.py).
* The Monte Carlo: for the built-in MLP and linear models each (example, draw) term's network output is
  drawn from its law under its own weight draw (local reparameterisation) instead of drawing the
  weights. Not the same random numbers, so not the same values: the test checks the same *law*, against
  the naive path (one full weight draw per row) run on the same model, and that the statement built on
  it (Hoeffding over independent terms) holds, with many independent repetitions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from hsgd_tune import bound
from hsgd_tune.certify import diagnostics
from hsgd_tune.certify.diagnostics import (
    PRIOR_STD_GRID,
    FlatModel,
    _bounded_error,
    _linear_chain,
    _snapshot,
    _soft_error,
    choose_sigma,
    draw_errors,
    fit_posterior,
    pointwise_draw_errors,
    top_hessian_eigenvalue,
)
from hsgd_tune.train.models import ModelSpec, build_model, flat_parameters


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Bit-for-bit comparisons of two code paths in one process, one thread (as measure() runs)."""


def mlp(seed: int = 0, features: int = 6, outputs: int = 3, widths=(16, 8)) -> FlatModel:
    torch.manual_seed(seed)
    spec = ModelSpec(kind="mlp", n_features=features, n_outputs=outputs, widths=widths)
    return FlatModel(build_model(spec), "classification")


def cnn(seed: int = 0) -> FlatModel:
    torch.manual_seed(seed)
    spec = ModelSpec(kind="cnn", n_features=16, n_outputs=3, channels=(2,), image_shape=(1, 4, 4))
    return FlatModel(build_model(spec), "classification")


def task(fm: FlatModel, n: int = 120, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    d = fm.model[0].in_features if isinstance(fm.model[0], nn.Linear) else 16
    x = torch.randn(n, d, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def reference_fit_posterior(fm, w_s, w_h, x, y, *, kind, steps, delta, loss_clip, batch, check_every, seed):
    """diagnostics.fit_posterior as it was before issue #17: torch.optim.Adam and fm.forward."""
    gen = torch.Generator().manual_seed(seed)
    n, p = len(y), fm.n_params
    prior_mean = torch.as_tensor(w_h, dtype=torch.float32)
    mean = torch.as_tensor(w_s, dtype=torch.float32).clone().requires_grad_(True)
    groups = fm.group_index() if kind == "layer" else torch.arange(p)
    start = max(float(torch.linalg.vector_norm(mean.detach() - prior_mean)) / math.sqrt(p), 1e-4)
    log_std = torch.full((int(groups.max()) + 1,), math.log(start), requires_grad=True)
    optimiser = torch.optim.Adam(
        [{"params": [mean], "lr": diagnostics.MEAN_LR}, {"params": [log_std], "lr": diagnostics.STD_LR}]
    )
    confidence = math.log(2.0 * math.sqrt(n) / delta)
    best = (math.inf, mean.detach().clone(), log_std.detach().clone())
    for step in range(steps + 1):
        if step % check_every == 0 or step == steps:
            snap = _snapshot(fm, mean, log_std, groups, prior_mean, x, y, loss_clip, n, delta, seed + step)
            best = min(best, snap, key=lambda t: t[0])
        if step == steps:
            break
        var_q = torch.exp(2.0 * log_std)[groups]
        var_p = (var_q.sum() + (mean - prior_mean).pow(2).sum()) / p
        ratio = var_q / var_p
        kl = 0.5 * ((ratio - 1.0 - torch.log(ratio)).sum() + (mean - prior_mean).pow(2).sum() / var_p)
        draw = mean + var_q.sqrt() * torch.randn(p, generator=gen)
        idx = torch.randperm(n, generator=gen)[:batch]
        out = functional_call(fm.model, fm.params(draw), (x[idx],))
        err = _soft_error(out, y[idx], fm.task, loss_clip).mean()
        c = (kl + confidence) / n
        relaxed = (torch.sqrt(err + c / 2) + torch.sqrt(c / 2)) ** 2
        optimiser.zero_grad()
        relaxed.backward()
        optimiser.step()
    mean_np = best[1].numpy().astype(np.float64)
    std_np = torch.exp(best[2])[groups].numpy().astype(np.float64)
    kls = [bound.gaussian_kl(mean_np, std_np**2, w_h, s**2) for s in PRIOR_STD_GRID]
    return mean_np, std_np, float(PRIOR_STD_GRID[np.argmin(kls)])


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("kind", ["layer", "weight"])
def test_the_posterior_is_bit_for_bit_the_one_torch_optim_adam_found(model, kind, monkeypatch):
    """The autograd path (any model that is not a chain; the chain's hand-written gradients are
    compared with it in tests/test_backprop.py)."""
    monkeypatch.setattr(diagnostics, "_by_hand", lambda fm: False)
    fm = mlp() if model == "mlp" else cnn()
    x, y = task(fm)
    w_s = flat_parameters(fm.model).double().numpy()
    w_h = w_s + 0.05 * np.random.default_rng(1).normal(size=w_s.shape)
    args = dict(kind=kind, steps=120, delta=1e-4, loss_clip=5.0, batch=64, check_every=40, seed=7)
    got = fit_posterior(fm, w_s, w_h, x, y, **args)
    mean, std, prior_std = reference_fit_posterior(fm, w_s, w_h, x, y, **args)
    np.testing.assert_array_equal(got.mean, mean)
    np.testing.assert_array_equal(got.std, std)
    assert got.prior_std == prior_std
    assert not np.array_equal(got.mean, w_s)  # the fit moved: the comparison is not of two no-ops


@pytest.mark.parametrize("factory", [mlp, lambda: mlp(widths=())])
def test_the_direct_forward_equals_functional_call_with_its_derivatives(factory):
    fm = factory()
    assert fm.chain is not None
    x, _ = task(fm)

    def reference(flat, inputs):
        return functional_call(fm.model, fm.params(flat), (inputs,))

    w = flat_parameters(fm.model).clone().requires_grad_(True)
    direct, slow = fm.forward(w, x), reference(w, x)
    assert torch.equal(direct, slow)
    (g1,) = torch.autograd.grad(direct.square().sum(), w, create_graph=True)
    (g2,) = torch.autograd.grad(slow.square().sum(), w, create_graph=True)
    assert torch.equal(g1, g2)
    v = torch.randn(len(w), generator=torch.Generator().manual_seed(0))
    (h1,) = torch.autograd.grad(g1, w, v)  # Hessian-vector products (top_hessian_eigenvalue)
    (h2,) = torch.autograd.grad(g2, w, v)
    assert torch.equal(h1, h2)
    many = w.detach() + 0.1 * torch.randn(5, len(w), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fm.forward_many(many, x), vmap(reference, in_dims=(0, None))(many, x))


def test_only_chains_of_linear_and_unitwise_layers_are_sampled_by_their_outputs():
    assert _linear_chain(mlp()) is not None
    assert _linear_chain(mlp(widths=())) is not None  # the linear model
    assert _linear_chain(cnn()) is None  # shared kernels: outputs at two positions are correlated
    torch.manual_seed(0)
    norm = FlatModel(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), "classification")
    assert _linear_chain(norm) is None  # LayerNorm mixes units and has parameters
    shared = nn.Linear(4, 4)
    tied = FlatModel(nn.Sequential(shared, nn.ReLU(), shared), "classification")
    assert _linear_chain(tied) is None  # one weight in two layers: not independent per layer
    hooked = mlp()
    hooked.model[0].register_forward_hook(lambda module, args, out: out * 2)
    assert _linear_chain(hooked) is None  # functional_call runs the hook; the direct path would not
    assert norm.chain is None  # through functional_call


def naive_rows(fm, mean, std, x, gen):
    """Each row under its own full weight draw (the path every other model still takes)."""
    mean_t, std_t = (torch.as_tensor(a, dtype=torch.float32) for a in (mean, std))
    weights = mean_t + std_t * torch.randn(len(x), len(mean_t), generator=gen)
    with torch.no_grad():
        return vmap(fm.forward)(weights, x.unsqueeze(1))[:, 0]


def test_the_sampled_outputs_have_the_law_of_outputs_under_drawn_weights():
    """Same moments per output unit and the same per-example error rates, at the sampling error of
    40 000 draws (means to 5 standard errors, variances to 5 %), and the two samples of one output are
    indistinguishable by a Kolmogorov–Smirnov test."""
    from scipy.stats import ks_2samp

    from hsgd_tune.certify.diagnostics import _sampled_outputs

    fm = mlp(seed=3)
    x, y = task(fm, n=4, seed=5)
    mean = flat_parameters(fm.model).double().numpy()
    std = np.abs(np.random.default_rng(2).normal(0.3, 0.1, size=mean.shape))  # per weight, all different
    m = 40_000
    xs = x.repeat_interleave(m, dim=0)
    naive = naive_rows(fm, mean, std, xs, torch.Generator().manual_seed(0)).view(4, m, 3)
    chain = _linear_chain(fm)
    mean_p = fm.params(torch.as_tensor(mean, dtype=torch.float32))
    var_p = fm.params(torch.as_tensor(std, dtype=torch.float32) ** 2)
    with torch.no_grad():
        fast = _sampled_outputs(chain, mean_p, var_p, xs, torch.Generator().manual_seed(1)).view(4, m, 3)
    se = naive.double().std(dim=1) / math.sqrt(m)
    assert (naive.double().mean(dim=1) - fast.double().mean(dim=1)).abs().max() < 5 * math.sqrt(2) * se.max()
    np.testing.assert_allclose(fast.double().var(dim=1), naive.double().var(dim=1), rtol=0.05)
    assert ks_2samp(naive[0, :, 0].numpy(), fast[0, :, 0].numpy()).pvalue > 1e-3
    err_naive = _bounded_error(naive, y[:, None], "classification", 5.0).double().mean(dim=1)
    err_fast = _bounded_error(fast, y[:, None], "classification", 5.0).double().mean(dim=1)
    assert (err_naive - err_fast).abs().max() < 5 * math.sqrt(2 * 0.25 / m)


def test_the_monte_carlo_statement_holds_over_repetitions():
    """The certified Monte-Carlo step: ``ê_Q <= kl⁻¹(ê^MC, ln(2/δ)/m)`` with probability ≥ 1 − δ over
    the draws. ê_Q (the error of Q on these examples) is measured to ±0.002 by the naive path; over 200
    repetitions of the fast path at δ = 0.1 the failures must be few (≤ 2·δ·200), and the fast path's
    mean must match ê_Q."""
    fm = mlp(seed=4)
    x, y = task(fm, n=100, seed=6)
    mean = flat_parameters(fm.model).double().numpy()
    std = np.full_like(mean, 0.25)
    m = 2000
    gen = torch.Generator().manual_seed(11)
    truth = float(
        np.mean(
            [
                _bounded_error(naive_rows(fm, mean, std, x, gen), y, "classification", 5.0).double().mean()
                for _ in range(m)
            ]
        )
    )
    reps, delta, failures, means = 200, 0.1, 0, []
    for seed in range(reps):
        errors = pointwise_draw_errors(fm, mean, std, x, y, 1, 5.0, seed)
        means.append(errors.mean())
        failures += truth > bound.mc_error_upper(float(errors.mean()), errors.size, delta)
    assert failures <= 2 * delta * reps
    assert abs(np.mean(means) - truth) < 5 * math.sqrt(0.25 / (reps * len(y))) + 0.002


def test_the_fast_monte_carlo_is_deterministic_and_reproduces_tiny_variances():
    fm = mlp()
    x, y = task(fm)
    w = flat_parameters(fm.model).double().numpy()
    a = pointwise_draw_errors(fm, w, np.full_like(w, 0.2), x, y, 3, seed=5)
    assert a.shape == (len(y), 3)
    np.testing.assert_array_equal(a, pointwise_draw_errors(fm, w, np.full_like(w, 0.2), x, y, 3, seed=5))
    with torch.no_grad():
        exact = (fm.forward(torch.as_tensor(w, dtype=torch.float32), x).argmax(-1) != y).double().numpy()
    tiny = pointwise_draw_errors(fm, w, np.full_like(w, 1e-9), x, y, 2)
    np.testing.assert_array_equal(tiny, np.repeat(exact[:, None], 2, axis=1))


@pytest.mark.parametrize("factory", [mlp, cnn])
def test_power_iteration_is_bit_for_bit_the_one_with_output_gradients(factory):
    """top_hessian_eigenvalue takes H v as the gradient of g·v (no sympy import on the first call);
    the power iteration as it was, v passed as g's output gradient, finds the same bits."""
    fm = factory()
    x, y = task(fm)
    w = flat_parameters(fm.model)

    def reference(iterations: int = 8, seed: int = 3) -> float:
        w_t = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fm.loss(w_t, x, y), w_t, create_graph=True)
        v = torch.randn(len(w_t), generator=torch.Generator().manual_seed(seed))
        v = v / torch.linalg.vector_norm(v)
        for _ in range(iterations):
            (hv,) = torch.autograd.grad(g, w_t, v, retain_graph=True)
            value = float(torch.linalg.vector_norm(hv))
            v = hv / value
        return value

    got = top_hessian_eigenvalue(fm, w.numpy(), x, y, iterations=8, seed=3)
    assert got == reference() and got > 0


@pytest.mark.parametrize("factory", [mlp, cnn])
def test_monte_carlo_draws_in_stacked_passes_are_bit_for_bit_vmaps(factory, monkeypatch):
    """The certificates' weight draws go through one stacked pass (grouping plan) instead of
    vmap(functional_call): several times faster for the CNN, and the same bits as the vmap path
    (taken when a model has no grouping plan) for the pilot, the snapshots and the certified draws."""
    fm = factory()
    x, y = task(fm)
    w = flat_parameters(fm.model).double().numpy()
    std = np.full(len(w), 0.3)

    def draws():
        return (
            pointwise_draw_errors(fm, w, std, x, y, 3, seed=4, local=False),  # each draw its example
            draw_errors(fm, w, std, x, y, 7, seed=5),  # each draw on all of x
            choose_sigma(fm, w, 0.5, x, y, len(y), 0.01, 5.0, seed=6),
        )

    stacked = draws()
    monkeypatch.setattr(diagnostics, "grouping_plan", lambda model: None)  # the vmap path
    reference = draws()
    assert 0 < stacked[0].mean() < 1 and 0 < stacked[1].mean() < 1  # not all right or all wrong
    np.testing.assert_array_equal(stacked[0], reference[0])
    np.testing.assert_array_equal(stacked[1], reference[1])
    assert stacked[2] == reference[2]
