"""Torch-side measurements (hsgd_tune.certify.diagnostics, hsgd_tune.train.noise) and their use in a trial.

Closed forms come from least squares with a linear model: the Hessian of ``mean (x·w + b - y)²`` is
``(2/n) X̃ᵀX̃`` with ``X̃ = [X, 1]`` (flat weights are ``[w, b]``), constant in w.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hsgd_tune import bound
from hsgd_tune.certify.diagnostics import (
    FlatModel,
    fit_posterior,
    gradient_mismatch,
    gradient_noise,
    pointwise_draw_errors,
    top_hessian_eigenvalue,
)
from hsgd_tune.data.datasets import Dataset, Split
from hsgd_tune.errors import ConfigError
from hsgd_tune.search.objective import evaluate
from hsgd_tune.studyfile.config import parse_study
from hsgd_tune.train.models import ModelSpec, build_model, flat_parameters
from hsgd_tune.train.noise import LevyNoise, subordinators
from hsgd_tune.train.twin import H_RUN, S_RUN, TrainSettings, train_twin

D = 4


def regression_data(n: int = 60, seed: int = 0, same: bool = False) -> Dataset:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=D)

    def split(k):
        x = rng.normal(size=(k, D)).astype(np.float32)
        return Split(x, (x @ w + 0.3 * rng.normal(size=k)).astype(np.float32))

    train = split(n)
    reference = train if same else split(n)
    return Dataset(train, reference, split(20), None, "regression", D, 1, "least squares")


LINEAR = ModelSpec(kind="linear", n_features=D, n_outputs=1)


def tensors(s: Split):
    return torch.as_tensor(s.x), torch.as_tensor(s.y)


def design(s: Split) -> np.ndarray:
    return np.hstack([s.x.astype(np.float64), np.ones((len(s.y), 1))])


def test_power_iteration_finds_the_top_hessian_eigenvalue_of_least_squares():
    data = regression_data()
    fm = FlatModel(build_model(LINEAR), "regression")
    x_tilde = design(data.train)
    exact = np.linalg.eigvalsh(2 * x_tilde.T @ x_tilde / len(x_tilde))[-1]
    w = np.random.default_rng(1).normal(size=D + 1)
    assert top_hessian_eigenvalue(fm, w, *tensors(data.train), iterations=300) == pytest.approx(
        exact, rel=1e-4
    )


def test_gradient_mismatch_matches_the_closed_form():
    data = regression_data()
    fm = FlatModel(build_model(LINEAR), "regression")
    traj = np.random.default_rng(2).normal(size=(3, D + 1))
    xs, xh = design(data.train), design(data.reference)

    def grad(x, y, w):
        return 2 * x.T @ (x @ w - y) / len(y)

    expected = [np.linalg.norm(grad(xs, data.train.y, w) - grad(xh, data.reference.y, w)) for w in traj]
    got = gradient_mismatch(fm, traj, tensors(data.train), tensors(data.reference))
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("weight_decay", [0.0, 0.2])
def test_full_batch_twin_distance_stays_below_the_analytic_bounds(weight_decay):
    # The real pipeline: full-batch GD (b = n), every step recorded, so Ê is the exact sup along the run.
    data = regression_data(n=60)
    settings = TrainSettings(
        learning_rate=0.1,
        batch_size=60,
        steps=80,
        record_every=1,
        seed=0,
        weight_decay=weight_decay,
        lipschitz_subsample=8,
    )
    run = train_twin(data, LINEAR, settings)
    fm = FlatModel(run.model, "regression")
    smooth = top_hessian_eigenvalue(fm, run.trajectories[H_RUN, -1], *tensors(data.train), iterations=300)
    smooth += weight_decay
    mismatch = gradient_mismatch(
        fm, run.trajectories[H_RUN], tensors(data.train), tensors(data.reference)
    ).max()
    dists = np.linalg.norm(run.trajectories[S_RUN] - run.trajectories[H_RUN], axis=1)
    for step, d in zip(run.record_steps, dists, strict=True):
        slack = 1e-4 * d + 1e-6  # float32 training
        assert d <= bound.gronwall_bound(0.1, smooth, mismatch, int(step)) + slack
        if weight_decay:
            assert d <= bound.contractive_bound(0.1, weight_decay, smooth, mismatch, int(step)) + slack


def test_levy_noise_is_shared_by_both_runs():
    # With H = S the only randomness left is the injected noise: shared, the runs stay identical.
    data = regression_data(same=True)
    noisy = TrainSettings(
        learning_rate=0.05,
        batch_size=10,
        steps=30,
        record_every=10,
        seed=0,
        noise_alpha=1.5,
        noise_sigma=0.1,
        lipschitz_subsample=8,
    )
    run = train_twin(data, LINEAR, noisy)
    np.testing.assert_array_equal(run.trajectories[S_RUN], run.trajectories[H_RUN])
    plain = train_twin(data, LINEAR, TrainSettings(**{**noisy.__dict__, "noise_sigma": 0.0}))
    assert not np.allclose(run.trajectories[S_RUN, -1], plain.trajectories[S_RUN, -1])


def test_subordinators_are_heavy_tailed_below_two_and_constant_at_two():
    assert np.all(subordinators(2.0, 50, 0) == 2.0)
    a = subordinators(1.2, 5000, 0)
    assert np.all(a > 0)
    assert a.max() / np.median(a) > 100  # α/2-stable: no mean


def test_levy_increment_scales_as_sigma_eta_to_one_over_alpha():
    noise = LevyNoise(alpha=2.0, sigma=0.5, learning_rate=0.04, steps=1, seed=0)
    inc = noise.increment(1, 200_000)
    # α = 2: σ η^{1/2} sqrt(2) N(0, I) = 0.5 · 0.2 · 1.414 per coordinate.
    assert float(inc.std()) == pytest.approx(0.5 * 0.2 * math.sqrt(2), rel=0.01)


def classification_setup(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(rng.normal(size=(200, D)).astype(np.float32))
    y = torch.as_tensor((x[:, 0] > 0).long())
    torch.manual_seed(seed)
    model = build_model(ModelSpec(kind="mlp", n_features=D, n_outputs=2, widths=(8,)))
    return FlatModel(model, "classification"), flat_parameters(model).double().numpy(), x, y


def test_tiny_posterior_variance_reproduces_the_deterministic_errors():
    fm, w, x, y = classification_setup()
    errors = pointwise_draw_errors(fm, w, np.full_like(w, 1e-9), x, y, draws=3)
    with torch.no_grad():
        exact = (fm.forward(torch.as_tensor(w, dtype=torch.float32), x).argmax(-1) != y).double().numpy()
    assert errors.shape == (200, 3)
    np.testing.assert_array_equal(errors, np.repeat(exact[:, None], 3, axis=1))


@pytest.mark.parametrize("kind", ["layer", "weight", "isotropic"])
def test_fitted_posterior_gives_a_valid_certificate(kind):
    fm, w_s, x, y = classification_setup()
    w_h = w_s + 0.05 * np.random.default_rng(3).normal(size=w_s.shape)
    posterior = fit_posterior(fm, w_s, w_h, x, y, kind=kind, steps=60, delta=1e-3, seed=0)
    assert posterior.prior_std in bound.pacbayes.geometric_grid(1e-4, 1.0, 41)
    if kind == "isotropic":
        expected = np.sum((w_s - w_h) ** 2) / (2 * posterior.prior_std**2)
        assert posterior.kl == pytest.approx(expected, rel=1e-9)
    errors = pointwise_draw_errors(fm, posterior.mean, posterior.std, x, y, draws=5, seed=1)
    cert = bound.certificate(
        float(errors.mean()), errors.size, posterior.kl, len(y), 1e-3, posterior.prior_std, 41
    )
    assert 0 <= cert.mc_error <= cert.error_upper <= cert.bound <= 1


def test_gradient_noise_is_minibatch_minus_full_gradient():
    fm, w, x, y = classification_setup()
    noise = gradient_noise(fm, w, x, y, batch_size=200, draws=4, seed=0)  # b = n: no noise at all
    assert noise.shape == (4, fm.n_params)
    assert np.abs(noise).max() < 1e-5
    noisy = gradient_noise(fm, w, x, y, batch_size=8, draws=64, seed=0)
    assert np.abs(noisy).max() > 1e-3


def test_gradient_noise_samples_are_independent_minibatches_not_one_epoch():
    """Two halves of one epoch would partition S: their noises would sum to exactly zero, and α̂'s
    block sums would cancel. Each sample is a fresh draw instead."""
    fm, w, x, y = classification_setup()
    pair = gradient_noise(fm, w, x, y, batch_size=len(y) // 2, draws=2, seed=0)
    assert np.abs(pair[0] + pair[1]).max() > 1e-3


def test_the_heldout_certificate_is_the_kl_bound_of_the_final_models_errors_on_h(tmp_path):
    from hsgd_tune.data.datasets import load_dataset
    from hsgd_tune.studyfile.grid import statement_deltas

    cfg = parse_study({**STUDY, "objectives": {"minimize": ["val_loss", "risk_bound"]}}, tmp_path)
    data = load_dataset(cfg.data, cfg.seed)
    outcome = evaluate(cfg, data, {"learning_rate": 0.05, "batch_size": 16})
    with torch.no_grad():
        out = outcome.run.model(torch.as_tensor(data.reference.x))
    errors = int((out.argmax(-1) != torch.as_tensor(data.reference.y)).sum())
    n, delta = len(data.reference.y), statement_deltas(cfg)["heldout"]
    expected = bound.heldout_upper(errors / n, n, delta / 2)
    assert outcome.metrics()["certificate/heldout_error"] == pytest.approx(expected, rel=1e-9)
    assert outcome.metrics()["certificate/heldout_measured"] == pytest.approx(errors / n, abs=1e-7)
    assert "certificate/perturbed_bound" not in outcome.metrics()  # only with the front certificates


STUDY = {
    "name": "diag",
    "data": {
        "source": "synthetic",
        "n_train": 120,
        "n_val": 60,
        "synthetic": {"n_features": 5, "n_classes": 3},
    },
    "model": {"kind": "mlp", "widths": [8]},
    "search": {"learning_rate": {"low": 0.01, "high": 0.1}, "batch_size": {"choices": [16]}},
    "training": {"steps": 60, "record_every": 20, "noise": {"alpha": 1.7, "sigma": 0.01}},
    "certificate": {"steps": 40, "mc_draws": 2},
    "diagnostics": {"noise_draws": 16},
    "objectives": {"minimize": ["val_loss", "certificate"]},
}


def test_a_trial_logs_certificate_tail_index_and_analytic_bounds(tmp_path):
    from hsgd_tune.data.datasets import load_dataset

    cfg = parse_study(STUDY, tmp_path)
    data = load_dataset(cfg.data, cfg.seed)
    outcome = evaluate(cfg, data, {"learning_rate": 0.05, "batch_size": 16})
    metrics, tags = outcome.metrics(), outcome.tags()
    for key in (
        "certificate/bound",
        "certificate/kl",
        "tail/alpha",
        "analytic/gronwall_bound",
        "analytic/mismatch",
        "certificate/perturbed_bound",
        "certificate/perturbed_bound_max",
        "certificate/heldout_error",
        "certificate/heldout_error_max",
    ):
        assert math.isfinite(metrics[key]), key
    assert metrics["certificate/perturbed_bound"] <= metrics["certificate/perturbed_bound_max"] <= 1
    assert 0 < metrics["tail/alpha"] <= 2
    assert outcome.objective("certificate") == metrics["certificate/bound"]
    # δ_λ = δ/|Λ| is split equally among the configuration's four statements.
    share = cfg.bound.delta / cfg.grid_size / 4
    for statement in ("trajectory", "heldout", "perturbed", "pacbayes"):
        assert metrics[f"bound/delta_{statement}"] == pytest.approx(share, rel=1e-12)
    assert metrics["certificate/delta"] == pytest.approx(share, rel=1e-12)
    assert tags["hsgd.assumption.certificate/perturbed_bound"].startswith("certified")
    assert tags["hsgd.assumption.certificate/heldout_error"].startswith("certified")
    assert tags["hsgd.assumption.certificate/bound"].startswith("certified")
    assert tags["hsgd.assumption.tail/alpha"].startswith("estimated")
    assert tags["hsgd.vacuous.certificate"] in ("true", "false")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"training": {"noise": {"alpha": 2.5}}}, "training.noise.alpha"),
        ({"training": {"noise": {"sigma": -1.0}}}, "training.noise.sigma"),
        ({"certificate": {"posterior": "diagonal"}}, "certificate.posterior"),
        ({"certificate": {"enabled": False}}, "objectives.minimize"),
        ({"search": {**STUDY["search"], "knobs": {"noise_alpha": {"low": 1.0, "high": 2.5}}}}, "noise_alpha"),
    ],
)
def test_new_study_keys_are_validated(tmp_path, change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_study({**STUDY, **change}, tmp_path)


def test_noise_knobs_may_be_searched_for_builtin_models(tmp_path):
    search = {**STUDY["search"], "knobs": {"noise_alpha": {"low": 1.2, "high": 2.0, "log": False}}}
    cfg = parse_study({**STUDY, "search": search}, tmp_path)
    assert cfg.search.knobs[0].name == "noise_alpha"


def test_iterate_risks_and_mean_gradient_norms_match_a_loop_over_weights():
    """The batched risks and L_pop gradients equal per-weight autograd on the clipped mean loss."""
    from hsgd_tune.certify.diagnostics import iterate_risks, mean_gradient_norms

    fm, w, x, y = classification_setup()
    rng = np.random.default_rng(0)
    points = np.stack([w + 0.5 * rng.normal(size=w.shape) for _ in range(5)]).astype(np.float32)
    clip = 1.0  # low enough that some examples are clipped (zero gradient there)
    risks = iterate_risks(fm, points, x, y, clip, chunk=2)
    norms = mean_gradient_norms(fm, points, x, y, clip, chunk=2)
    for k, p in enumerate(points):
        wt = torch.as_tensor(p).clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(fm.forward(wt, x), y, reduction="none").clamp(max=clip)
        (grad,) = torch.autograd.grad(loss.mean(), wt)
        assert risks[k] == pytest.approx(float(loss.mean().detach()), rel=1e-5)
        assert norms[k] == pytest.approx(float(grad.norm()), rel=1e-4)
