"""Tests for hsgd_tune.train.twin: the twin SGD run (DESIGN.md §2, "Reference dynamics")."""

from __future__ import annotations

import copy
import dataclasses
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from hsgd_tune.data.datasets import Dataset, Split
from hsgd_tune.errors import DivergedError
from hsgd_tune.train.models import (
    ModelSpec,
    build_model,
    count_parameters,
    flat_parameters,
    load_flat_parameters,
)
from hsgd_tune.train.twin import (
    H_RUN,
    S_RUN,
    SequentialTwin,
    StackedTwin,
    TrainSettings,
    clipped_gradient_norms,
    initial_model,
    lipschitz_subsample,
    make_twin,
    minibatch_positions,
    per_example_loss,
    train_twin,
)

D, K, WIDTH = 6, 3, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(rng: np.random.Generator, n: int) -> Split:
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = x[:, :K].argmax(axis=1).astype(np.int64)  # learnable, so losses move
    return Split(x, y)


def make_data(n_train: int = 120, n_reference: int = 90, n_val: int = 60, seed: int = 0) -> Dataset:
    """Synthetic classification splits; H smaller than S so the ``% |H|`` indexing is exercised."""
    rng = np.random.default_rng(seed)
    return Dataset(
        train=_split(rng, n_train),
        reference=_split(rng, n_reference),
        val=_split(rng, n_val),
        test=None,
        task="classification",
        n_features=D,
        n_outputs=K,
        description="synthetic test data",
    )


def settings(**kw) -> TrainSettings:
    base = dict(learning_rate=0.2, batch_size=16, steps=50, record_every=10, seed=3, lipschitz_subsample=16)
    return TrainSettings(**{**base, **kw})


BUILTIN = ModelSpec(kind="mlp", n_features=D, n_outputs=K, widths=(WIDTH,))


@pytest.fixture
def user_spec(tmp_path, monkeypatch) -> ModelSpec:
    """The same MLP as BUILTIN, but reached through a user entry point (so: SequentialTwin)."""
    (tmp_path / "twin_user_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def mlp(n_features, n_outputs, width):
                return nn.Sequential(nn.Linear(n_features, width), nn.ReLU(), nn.Linear(width, n_outputs))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return ModelSpec(
        kind="entry_point",
        n_features=D,
        n_outputs=K,
        entry_point="twin_user_models:mlp",
        kwargs=(("width", WIDTH),),
    )


def plain_sgd(
    model: nn.Module, split: Split, s: TrainSettings, n_positions: int, task: str = "classification"
) -> np.ndarray:
    """One run, the textbook way: torch.optim.SGD on one split, minibatches at the shared positions
    (modulo the split's size). Returns the iterates at 0, r, 2r, ..., steps: (N, p)."""
    model = copy.deepcopy(model)
    x, y = torch.as_tensor(split.x), torch.as_tensor(split.y)
    opt = torch.optim.SGD(
        model.parameters(), lr=s.learning_rate, momentum=s.momentum, weight_decay=s.weight_decay
    )
    recorded = [flat_parameters(model).numpy().copy()]
    for step, pos in enumerate(minibatch_positions(n_positions, s.batch_size, s.steps, s.seed), start=1):
        idx = torch.as_tensor(pos) % len(y)
        loss = per_example_loss(model(x[idx]), y[idx], task).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % s.record_every == 0 or step == s.steps:
            recorded.append(flat_parameters(model).numpy().copy())
    return np.stack(recorded)


# ---------------------------------------------------------------------------------------------
# Lock step = one after the other
# ---------------------------------------------------------------------------------------------


def test_make_twin_picks_stacked_for_builtin_and_sequential_for_user_models(user_spec):
    assert isinstance(make_twin(build_model(BUILTIN), BUILTIN), StackedTwin)
    assert isinstance(make_twin(build_model(user_spec), user_spec), SequentialTwin)


def test_stacked_twin_flat_matches_module_flat_parameters():
    model = initial_model(BUILTIN, seed=1)
    flat = StackedTwin(model).flat()
    assert flat.shape == (2, count_parameters(model))
    torch.testing.assert_close(flat[0], flat_parameters(model), rtol=0, atol=0)
    torch.testing.assert_close(flat[1], flat_parameters(model), rtol=0, atol=0)


def test_stacked_and_sequential_twins_equal_two_plain_sgd_loops(user_spec):
    data, s = make_data(), settings()
    stacked = train_twin(data, BUILTIN, s)
    sequential = train_twin(data, user_spec, s)

    # Same initialisation for both kinds of twin, and for both runs of each.
    init = flat_parameters(initial_model(BUILTIN, s.seed)).numpy()
    for run in (stacked, sequential):
        np.testing.assert_array_equal(run.trajectories[:, 0], np.stack([init, init]))

    np.testing.assert_allclose(stacked.trajectories, sequential.trajectories, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(stacked.record_steps, sequential.record_steps)

    # "Numerically identical to running them one after the other": SGD on S alone, then on H alone.
    model = initial_model(BUILTIN, s.seed)
    n_s = len(data.train)
    ref_s = plain_sgd(model, data.train, s, n_s)
    ref_h = plain_sgd(model, data.reference, s, n_s)
    for run in (stacked, sequential):
        np.testing.assert_allclose(run.trajectories[S_RUN], ref_s, rtol=0, atol=1e-5)
        np.testing.assert_allclose(run.trajectories[H_RUN], ref_h, rtol=0, atol=1e-5)
    # The runs really differ (they see different data), so the comparison above means something.
    assert np.abs(ref_s[-1] - ref_h[-1]).max() > 1e-2


@pytest.mark.parametrize(
    "widths", [(), (WIDTH,), (WIDTH, 5, 4)], ids=["linear", "one-hidden", "three-hidden"]
)
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_hand_written_backward_matches_autograd(widths, task):
    """StackedTwin's gradients are autograd's, for every depth and both losses."""
    n_out = K if task == "classification" else 1
    spec = ModelSpec(kind="mlp" if widths else "linear", n_features=D, n_outputs=n_out, widths=widths)
    twin = StackedTwin(initial_model(spec, seed=2))
    with torch.no_grad():  # the two runs' weights must differ, or a swapped run would go unseen
        for p in twin.params:
            p[1] += 0.1 * torch.randn_like(p[1])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, D, generator=gen)
    y = torch.randint(0, K, (2, 11), generator=gen) if task == "classification" else torch.randn(2, 11)

    loss, grads = twin.loss_and_gradients(x, y, task)

    params = [p.clone().requires_grad_(True) for p in twin.params]
    h = x
    for i, (w, b) in enumerate(zip(params[::2], params[1::2], strict=True)):
        h = torch.baddbmm(b, torch.relu(h) if i else h, w.transpose(1, 2))
    expected = per_example_loss(h, y, task).mean(dim=1)
    expected_grads = torch.autograd.grad(expected.sum(), params)
    torch.testing.assert_close(loss, expected.detach())
    assert [g.shape for g in grads] == [p.shape for p in params]
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def make_regression_data() -> Dataset:
    rng = np.random.default_rng(4)
    splits = []
    for n in (120, 90, 60):
        x = rng.normal(size=(n, D)).astype(np.float32)
        splits.append(Split(x, (x[:, 0] - 0.5 * x[:, 1]).astype(np.float32)))
    return Dataset(*splits, test=None, task="regression", n_features=D, n_outputs=1, description="regression")


def test_regression_twin_equals_two_plain_sgd_loops():
    data, s = make_regression_data(), settings(learning_rate=0.05)
    spec = ModelSpec(kind="mlp", n_features=D, n_outputs=1, widths=(WIDTH, 4))
    run = train_twin(data, spec, s)
    model = initial_model(spec, s.seed)
    n_s = len(data.train)
    np.testing.assert_allclose(
        run.trajectories[S_RUN], plain_sgd(model, data.train, s, n_s, "regression"), rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        run.trajectories[H_RUN], plain_sgd(model, data.reference, s, n_s, "regression"), rtol=0, atol=1e-5
    )
    assert run.final["train/loss"] < run.curves["train/minibatch_loss"][0]  # it learned something


def test_same_split_as_s_and_h_gives_identical_trajectories(user_spec):
    data = make_data()
    twin_data = dataclasses.replace(data, reference=data.train, description="S == H")
    for spec in (BUILTIN, user_spec):
        run = train_twin(twin_data, spec, settings())
        assert np.abs(run.trajectories[S_RUN] - run.trajectories[H_RUN]).max() == 0.0
        assert not np.array_equal(run.trajectories[S_RUN, 0], run.trajectories[S_RUN, -1])  # it moved


def test_recorded_steps_shapes_and_flat_order():
    data = make_data()
    s = settings(steps=47, record_every=10)
    run = train_twin(data, BUILTIN, s)
    np.testing.assert_array_equal(run.record_steps, [0, 10, 20, 30, 40, 47])
    p = count_parameters(build_model(BUILTIN))
    assert run.trajectories.shape == (2, 6, p)
    assert run.trajectories.dtype == np.float32
    for name, curve in run.curves.items():
        assert curve.shape == (6,), name
    assert run.grad_norms.shape == (2, 6, s.lipschitz_subsample)

    # The final model's flat parameters are the S-run's last iterate ...
    np.testing.assert_array_equal(flat_parameters(run.model).numpy(), run.trajectories[S_RUN, -1])
    # ... and the coordinates are in module order: the rebuilt model reproduces the logged val loss.
    with torch.no_grad():
        out = run.model(torch.as_tensor(data.val.x))
        val_loss = per_example_loss(out, torch.as_tensor(data.val.y), data.task).mean().item()
    assert val_loss == pytest.approx(run.final["val/loss"], abs=1e-5)
    assert run.curves["val/loss"][-1] == pytest.approx(run.final["val/loss"], abs=1e-6)


def test_record_every_dividing_steps_records_last_once():
    run = train_twin(make_data(), BUILTIN, settings(steps=40, record_every=10))
    np.testing.assert_array_equal(run.record_steps, [0, 10, 20, 30, 40])


# ---------------------------------------------------------------------------------------------
# Shared randomness: minibatch positions
# ---------------------------------------------------------------------------------------------


def test_minibatch_positions_are_epochs_of_permutations():
    n, b, steps = 50, 8, 31
    batches = list(minibatch_positions(n, b, steps, seed=7))
    assert len(batches) == steps
    assert all(len(batch) == b for batch in batches)
    per_epoch = n // b
    for start in range(0, steps, per_epoch):
        epoch = np.concatenate(batches[start : start + per_epoch])
        assert len(np.unique(epoch)) == len(epoch), "a position repeats within an epoch"
        assert epoch.min() >= 0 and epoch.max() < n
    # Successive epochs are reshuffled.
    assert not np.array_equal(
        np.concatenate(batches[:per_epoch]), np.concatenate(batches[per_epoch : 2 * per_epoch])
    )


def test_minibatch_positions_deterministic_per_seed():
    a = list(minibatch_positions(40, 5, 20, seed=1))
    b = list(minibatch_positions(40, 5, 20, seed=1))
    c = list(minibatch_positions(40, 5, 20, seed=2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_minibatch_positions_full_batch():
    batches = list(minibatch_positions(10, 10, 3, seed=0))
    assert len(batches) == 3
    assert all(sorted(batch) == list(range(10)) for batch in batches)


@pytest.mark.parametrize("batch_size", [0, 11])
def test_minibatch_positions_rejects_impossible_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        next(minibatch_positions(10, batch_size, 3, seed=0))


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------


def test_huge_learning_rate_raises_diverged_error_with_reason():
    with pytest.raises(DivergedError) as info:
        train_twin(make_data(), BUILTIN, settings(learning_rate=1e4, steps=100))
    assert info.value.reason
    assert "run" in info.value.reason  # names the run (empirical or reference)
    assert 0 < info.value.step <= 100
    assert f"step {info.value.step}" in str(info.value)


def test_nan_data_raises_diverged_error():
    data = make_data()
    x = data.train.x.copy()
    x[0, 0] = np.nan
    bad = dataclasses.replace(data, train=Split(x, data.train.y), description="S with a NaN")
    with pytest.raises(DivergedError) as info:
        train_twin(bad, BUILTIN, settings())
    assert "empirical" in info.value.reason
    assert "nan" in info.value.reason.lower()


def test_divergence_factor_is_relative_to_initial_loss():
    # A modest learning rate passes with the default factor but trips a factor below 1 at once.
    data = make_data()
    train_twin(data, BUILTIN, settings())
    with pytest.raises(DivergedError, match="divergence_factor"):
        train_twin(data, BUILTIN, settings(divergence_factor=0.01))


# ---------------------------------------------------------------------------------------------
# Per-example gradient norms of the clipped loss
# ---------------------------------------------------------------------------------------------


def test_clipped_gradient_norms_match_a_naive_per_example_loop():
    data = make_data()
    spec = ModelSpec(kind="mlp", n_features=D, n_outputs=K, widths=(4,))
    model = initial_model(spec, seed=0)
    p = count_parameters(model)
    rng = np.random.default_rng(0)
    # Iterates at several scales so that some examples' losses exceed the clip level and some don't.
    scales = np.array([0.5, 1.0, 3.0, 8.0])[None, :, None]
    trajectories = (rng.normal(size=(2, 4, p)) * scales).astype(np.float32)
    loss_clip, m, seed = 1.5, 12, 5

    got = clipped_gradient_norms(model, trajectories, data, loss_clip, m, seed)
    assert got.shape == (2, 4, m)

    x_np, y_np = lipschitz_subsample(data, m, seed)
    x, y = torch.as_tensor(x_np), torch.as_tensor(y_np)
    expected = np.zeros_like(got)
    clipped = 0
    for r in range(2):
        for k in range(4):
            net = load_flat_parameters(copy.deepcopy(model), torch.as_tensor(trajectories[r, k]))
            for i in range(m):
                loss = per_example_loss(net(x[i : i + 1]), y[i : i + 1], data.task)[0]
                if loss.item() >= loss_clip:  # min(ℓ, B) is flat here
                    clipped += 1
                    continue
                grads = torch.autograd.grad(loss, list(net.parameters()))
                expected[r, k, i] = torch.sqrt(sum((g**2).sum() for g in grads)).item()
    assert 0 < clipped < expected.size, "the example must mix clipped and unclipped losses"
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_lipschitz_subsample_is_fixed_and_draws_from_both_splits():
    data = make_data()
    x1, y1 = lipschitz_subsample(data, 10, seed=4)
    x2, y2 = lipschitz_subsample(data, 10, seed=4)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert len(y1) == 10
    from_s = sum(any(np.array_equal(row, s) for s in data.train.x) for row in x1)
    from_h = sum(any(np.array_equal(row, h) for h in data.reference.x) for row in x1)
    assert (from_s, from_h) == (5, 5)


# ---------------------------------------------------------------------------------------------
# Outside the theory: momentum and weight decay as torch.optim.SGD does them
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["builtin", "user"])
def test_momentum_and_weight_decay_match_torch_sgd(which, user_spec):
    spec = BUILTIN if which == "builtin" else user_spec
    data = make_data()
    s = settings(learning_rate=0.05, momentum=0.9, weight_decay=1e-2)
    assert s.outside_theory == ["momentum", "weight_decay"]
    run = train_twin(data, spec, s)
    model = initial_model(BUILTIN, s.seed)
    ref_s = plain_sgd(model, data.train, s, len(data.train))
    ref_h = plain_sgd(model, data.reference, s, len(data.train))
    np.testing.assert_allclose(run.trajectories[S_RUN], ref_s, rtol=0, atol=1e-5)
    np.testing.assert_allclose(run.trajectories[H_RUN], ref_h, rtol=0, atol=1e-5)
    # And plain SGD (no momentum) is a different trajectory: the knobs are really applied.
    plain = plain_sgd(model, data.train, settings(learning_rate=0.05), len(data.train))
    assert np.abs(plain[-1] - ref_s[-1]).max() > 1e-3


def test_plain_sgd_is_inside_theory():
    assert settings().outside_theory == []
