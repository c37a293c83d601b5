"""Lock-step twins beyond the MLP (issue #17): the CNN's grouped convolution and torch.func's vmap
compute what two separate SGD runs compute, and the CNN is configured and validated like the rest."""

from __future__ import annotations

import copy
import dataclasses
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hsgd_tune.data.datasets import Dataset, Split
from hsgd_tune.errors import ConfigError
from hsgd_tune.studyfile.config import load_study, parse_study
from hsgd_tune.studyfile.export import config_from_dict
from hsgd_tune.train import twin as training
from hsgd_tune.train.models import ModelSpec, build_model, flat_parameters
from hsgd_tune.train.twin import (
    H_RUN,
    S_RUN,
    FuncTwin,
    GroupedTwin,
    SequentialTwin,
    StackedTwin,
    TrainSettings,
    _vmap_gradient_norms,
    batched_gradient_norms,
    choose_twin,
    grouping_plan,
    initial_model,
    make_twin,
    minibatch_positions,
    per_example_loss,
    train_twin,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STUDIES = Path(__file__).resolve().parent.parent / "studies"
IMAGE = (2, 4, 4)  # two channels of 4 × 4: the grouped convolution must keep the runs' channels apart
D, K = 32, 3
CNN = ModelSpec("cnn", D, K, channels=(3, 4), image_shape=IMAGE, kernel_size=3)


def make_data(n_train: int = 96, n_reference: int = 72, n_val: int = 40, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        x = rng.normal(size=(n, D)).astype(np.float32)
        return Split(x, x[:, :K].argmax(axis=1).astype(np.int64))

    return Dataset(split(n_train), split(n_reference), split(n_val), None, "classification", D, K, "test")


def settings(**kw) -> TrainSettings:
    base = dict(learning_rate=0.2, batch_size=16, steps=40, record_every=10, seed=3, lipschitz_subsample=8)
    return TrainSettings(**{**base, **kw})


def plain_sgd(model: nn.Module, split: Split, s: TrainSettings, n_positions: int) -> np.ndarray:
    """One run with torch.optim.SGD at the shared positions (mod |split|): iterates (N, p)."""
    model = copy.deepcopy(model)
    x, y = torch.as_tensor(split.x), torch.as_tensor(split.y)
    opt = torch.optim.SGD(model.parameters(), lr=s.learning_rate)
    recorded = [flat_parameters(model).numpy().copy()]
    for step, pos in enumerate(minibatch_positions(n_positions, s.batch_size, s.steps, s.seed), start=1):
        idx = torch.as_tensor(pos) % len(y)
        loss = per_example_loss(model(x[idx]), y[idx], "classification").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % s.record_every == 0 or step == s.steps:
            recorded.append(flat_parameters(model).numpy().copy())
    return np.stack(recorded)


def assert_twin_is_two_plain_runs(run, spec: ModelSpec, data: Dataset, s: TrainSettings) -> None:
    model = initial_model(spec, s.seed)
    n_s = len(data.train)
    np.testing.assert_allclose(
        run.trajectories[S_RUN], plain_sgd(model, data.train, s, n_s), rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        run.trajectories[H_RUN], plain_sgd(model, data.reference, s, n_s), rtol=0, atol=1e-5
    )
    assert np.abs(run.trajectories[S_RUN, -1] - run.trajectories[H_RUN, -1]).max() > 1e-2  # they differ


# ---------------------------------------------------------------------------------------------
# The CNN
# ---------------------------------------------------------------------------------------------


def test_cnn_twin_equals_two_sequential_plain_runs():
    data, s = make_data(), settings()
    run = train_twin(data, CNN, s)
    assert run.twin == "grouped"
    assert_twin_is_two_plain_runs(run, CNN, data, s)


def test_cnn_twin_outputs_are_each_runs_own_module_outputs():
    model = initial_model(CNN, seed=1)
    twin = GroupedTwin(model, grouping_plan(model))
    with torch.no_grad():  # make the runs differ, so a swapped channel group would be seen
        for p in twin.params:
            p[1] += 0.1 * torch.randn_like(p[1])
    x = torch.randn(2, 5, D)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for q, p in zip(other.parameters(), twin.params, strict=True):
            q.copy_(p[1].reshape(q.shape))
    got = twin.forward(x)
    torch.testing.assert_close(got[0], model(x[0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], other(x[1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twin.flat()[0], flat_parameters(model))


def test_cnn_gradient_norms_in_closed_form_equal_vmap_grad_one_iterate_at_a_time(monkeypatch):
    data = make_data()
    called = []
    monkeypatch.setattr(training, "batched_gradient_norms", lambda *a: called.append(a))  # not taken
    run = train_twin(data, CNN, settings(steps=20, record_every=5))
    assert not called
    closed_form = run.grad_norms  # computed in the trial by plan_gradient_norms
    one_by_one = _vmap_gradient_norms(run.model, run.trajectories, data, 5.0, 8, seed=3)
    assert closed_form.shape == one_by_one.shape == (2, 5, 8)
    np.testing.assert_allclose(closed_form, one_by_one, rtol=1e-5, atol=1e-6)


def test_batched_gradient_norms_in_small_chunks_equal_one_chunk(monkeypatch):
    data = make_data()
    run = train_twin(data, CNN, settings(steps=20, record_every=5))
    whole = batched_gradient_norms(run.model, run.trajectories, data, 5.0, 8, seed=3)
    monkeypatch.setattr(training, "_CHUNK_ELEMENTS", 1)  # one iterate per chunk
    chunked = batched_gradient_norms(run.model, run.trajectories, data, 5.0, 8, seed=3)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(whole, run.grad_norms, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "layers",
    [
        # strided, dilated and unpadded convolutions, one without bias, average pooling, Tanh
        lambda: [
            nn.Unflatten(1, IMAGE),
            nn.Conv2d(2, 3, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 5, 2, bias=False),
            nn.Flatten(),
            nn.Linear(5, K),
        ],
        lambda: [
            nn.Unflatten(1, IMAGE),
            nn.Conv2d(2, 4, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(4, 3, 1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(12, 6, bias=False),
            nn.ReLU(),
            nn.Linear(6, K),
        ],
    ],
)
def test_closed_form_gradient_norms_of_user_convolutional_sequentials_equal_vmap_grad(layers, monkeypatch):
    """Any grouping plan with convolutions takes the closed form (patches × δ per example), in one
    chunk or in many, and it equals per-iterate vmap(grad), clipped examples included."""
    data = make_data()
    torch.manual_seed(0)
    model = nn.Sequential(*layers())
    assert grouping_plan(model) is not None
    p = sum(q.numel() for q in model.parameters())
    scales = np.geomspace(0.3, 6.0, 5)[None, :, None]  # some losses above the clip, some below
    traj = (np.random.default_rng(1).normal(size=(2, 5, p)) * scales).astype(np.float32)
    slow = _vmap_gradient_norms(model, traj, data, 2.0, 12, seed=1)
    assert 0 < np.mean(slow == 0) < 1, "the case must mix clipped and unclipped examples"
    called = []
    monkeypatch.setattr(training, "batched_gradient_norms", lambda *a: called.append(a))  # not taken
    fast = training.clipped_gradient_norms(model, traj, data, 2.0, 12, seed=1)
    assert not called
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(training, "_CHUNK_ELEMENTS", 1)  # one model per chunk
    chunked = training.clipped_gradient_norms(model, traj, data, 2.0, 12, seed=1)
    np.testing.assert_allclose(chunked, fast, rtol=1e-5, atol=1e-6)


def test_cnn_study_file_on_digits_loads_and_its_shape_fits_the_data():
    from hsgd_tune.search.prepare import prepare

    cfg = load_study(STUDIES / "cnn_digits.toml")
    assert cfg.model.kind == "cnn" and cfg.model.image_shape == (1, 8, 8)
    short = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, steps=10, record_every=5))
    data = prepare(short)  # builds the model: image_shape must multiply to the 64 features
    from hsgd_tune.search.objective import evaluate

    outcome = evaluate(short, data, {"learning_rate": 0.05, "batch_size": 16})
    assert outcome.run.twin == "grouped" and np.isfinite(outcome.bound.risk_bound)


BASE = {
    "name": "t",
    "data": {"source": "digits", "n_train": 100, "n_val": 100},
    "search": {"learning_rate": {"low": 0.01, "high": 0.1}, "batch_size": {"choices": [8]}},
}


def _model(**model) -> dict:
    return {**BASE, "model": model}


@pytest.mark.parametrize(
    "model, key",
    [
        ({"kind": "cnn"}, "model.image_shape"),
        ({"kind": "cnn", "image_shape": [8, 8]}, "model.image_shape"),
        ({"kind": "cnn", "image_shape": [1, 8, 0]}, "model.image_shape"),
        ({"kind": "cnn", "image_shape": [1, 4, 4], "channels": [4, 4, 4]}, "model.image_shape"),
        ({"kind": "cnn", "image_shape": [1, 8, 8], "channels": []}, "model.channels"),
        ({"kind": "cnn", "image_shape": [1, 8, 8], "channels": [8, -1]}, "model.channels[1]"),
        ({"kind": "cnn", "image_shape": [1, 8, 8], "kernel_size": 2}, "model.kernel_size"),
        ({"kind": "cnn", "image_shape": [1, 8, 8], "widths": [4]}, "model.widths"),
        ({"kind": "mlp", "channels": [4]}, "model.channels"),
    ],
)
def test_cnn_keys_are_validated_with_the_key_named(tmp_path, model, key):
    with pytest.raises(ConfigError) as info:
        parse_study(_model(**model), tmp_path)
    assert info.value.key == key


def test_image_shape_that_does_not_hold_the_features_is_a_config_error():
    spec = dataclasses.replace(CNN, image_shape=(1, 5, 5))
    with pytest.raises(ConfigError, match="must hold the data's 32 features") as info:
        build_model(spec)
    assert info.value.key == "model.image_shape"


def test_cnn_keys_leave_other_studies_configs_and_fingerprints_alone(tmp_path):
    """Studies made before the CNN existed resume, and are certified by name from their stored config:
    an MLP's resolved config has no CNN keys, and a stored config reads back to the same study."""
    mlp = parse_study(_model(kind="mlp"), tmp_path)
    cnn = parse_study(_model(kind="cnn", image_shape=[1, 8, 8]), tmp_path)
    wider = parse_study(_model(kind="cnn", image_shape=[1, 8, 8], channels=[4]), tmp_path)
    assert mlp.fingerprint() != cnn.fingerprint() != wider.fingerprint()
    assert set(mlp.to_dict()["model"]) == {"kind", "widths", "entry_point"}
    assert cnn.to_dict()["model"]["image_shape"] == [1, 8, 8]
    for cfg in (mlp, cnn):
        assert config_from_dict(cfg.to_dict(), tmp_path).fingerprint() == cfg.fingerprint()


# ---------------------------------------------------------------------------------------------
# User models through torch.func
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def user_spec(tmp_path, monkeypatch) -> ModelSpec:
    (tmp_path / "lockstep_user_models.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def tanh_mlp(n_features, n_outputs, width):
                return nn.Sequential(nn.Linear(n_features, width), nn.Tanh(), nn.Linear(width, n_outputs))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return ModelSpec("entry_point", D, K, entry_point="lockstep_user_models:tanh_mlp", kwargs=(("width", 6),))


KINDS = {
    "stacked": StackedTwin,  # tanh differentiated by hand
    "grouped": lambda m: GroupedTwin(m, grouping_plan(m)),
    "vmap": FuncTwin,
    "sequential": SequentialTwin,
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_grouped_vmap_and_sequential_twins_equal_two_sequential_plain_runs(kind, user_spec, monkeypatch):
    monkeypatch.setattr(training, "choose_twin", lambda model, probe: KINDS[kind](model))  # force it
    data, s = make_data(), settings()
    run = train_twin(data, user_spec, s)
    assert run.twin == kind
    assert_twin_is_two_plain_runs(run, user_spec, data, s)


def test_choice_is_measured_once_per_model_and_batch_shape(user_spec, monkeypatch):
    timed = []
    real = training._time_twins
    monkeypatch.setattr(training, "_CHOSEN", {})
    monkeypatch.setattr(training, "_time_twins", lambda *a: timed.append(1) or real(*a))
    model = build_model(user_spec)
    probe = (torch.randn(2, 8, D), torch.randint(0, K, (2, 8)), "classification")
    first = choose_twin(model, probe)
    again = choose_twin(build_model(user_spec), probe)
    assert isinstance(first, (StackedTwin, GroupedTwin, FuncTwin, SequentialTwin))
    assert type(again) is type(first)
    assert len(timed) == 1
    choose_twin(model, (torch.randn(2, 16, D), torch.randint(0, K, (2, 16)), "classification"))
    assert len(timed) == 2  # another batch size is timed anew


@pytest.mark.parametrize(
    "layers",
    [
        lambda: [nn.Linear(D, 6), nn.BatchNorm1d(6), nn.Linear(6, K)],
        lambda: [nn.Linear(D, 6), nn.Dropout(0.5), nn.Linear(6, K)],
    ],
    ids=["buffers", "dropout"],
)
def test_models_no_lock_step_kind_can_step_stay_sequential(layers, monkeypatch):
    monkeypatch.setattr(training, "_CHOSEN", {})
    probe = (torch.randn(2, 8, D), torch.randint(0, K, (2, 8)), "classification")
    assert isinstance(choose_twin(nn.Sequential(*layers()), probe), SequentialTwin)


def test_make_twin_without_probe_is_sequential_for_user_models(user_spec):
    assert isinstance(make_twin(build_model(user_spec), user_spec), SequentialTwin)
    assert isinstance(make_twin(build_model(CNN), CNN), GroupedTwin)


@pytest.mark.parametrize(
    "layers, steps",
    [
        ([nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, K, bias=False)], ["linear", "per-example", "linear"]),
        (
            [nn.Unflatten(1, IMAGE), nn.Conv2d(2, 3, 3, padding="same"), nn.AvgPool2d(2), nn.Flatten()],
            ["unflatten", "conv", "per-example", "flatten"],
        ),
    ],
)
def test_grouping_plan_of_sequentials_of_common_layers(layers, steps):
    plan = grouping_plan(nn.Sequential(*layers))
    assert [step for step, _ in plan] == steps


@pytest.mark.parametrize(
    "layers",
    [
        [nn.Linear(D, 4), nn.LayerNorm(4), nn.Linear(4, K)],  # a layer it does not know
        [nn.Linear(D, 4), nn.BatchNorm1d(4)],  # buffers
        [nn.Unflatten(1, IMAGE), nn.Conv2d(2, 4, 3, groups=2), nn.Flatten()],  # a grouped conv already
        [nn.Unflatten(1, IMAGE), nn.Conv2d(2, 3, 3)],  # ends on images, not rows
        [nn.MaxPool2d(2), nn.Linear(D, K)],  # pooling rows
    ],
)
def test_grouping_plan_refuses_what_it_cannot_step_exactly(layers):
    assert grouping_plan(nn.Sequential(*layers)) is None


def test_user_sequential_with_convolutions_grouped_equals_its_modules():
    model = nn.Sequential(
        nn.Unflatten(1, IMAGE),
        nn.Conv2d(2, 3, 3, padding=1, stride=2),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(12, K),
    )
    twin = GroupedTwin(model, grouping_plan(model))
    with torch.no_grad():
        for p in twin.params:
            p[1] += 0.1 * torch.randn_like(p[1])
    other = copy.deepcopy(model)
    with torch.no_grad():
        for q, p in zip(other.parameters(), twin.params, strict=True):
            q.copy_(p[1].reshape(q.shape))
    x = torch.randn(2, 5, D)
    got = twin.forward(x)
    torch.testing.assert_close(got[0], model(x[0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], other(x[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_hand_written_backward_of_tanh_and_sigmoid_stacks_equals_autograd(task):
    """StackedTwin's hand-written backward (tanh: 1 − a², sigmoid: a(1 − a), ReLU: sign(a)) gives the
    gradients autograd gives through GroupedTwin, for both runs."""
    torch.manual_seed(0)
    k = K if task == "classification" else 1
    model = nn.Sequential(
        nn.Linear(D, 6), nn.Sigmoid(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, k)
    )
    assert training.hand_differentiable(model) == [nn.Sigmoid, nn.Tanh, nn.ReLU]
    stacked, grouped = (
        StackedTwin(copy.deepcopy(model)),
        GroupedTwin(copy.deepcopy(model), grouping_plan(model)),
    )
    with torch.no_grad():  # make the runs differ
        for p, q in zip(stacked.params, grouped.params, strict=True):
            p[1] += 0.3 * torch.randn_like(p[1])
            q.copy_(p)
    x = torch.randn(2, 9, D)
    y = torch.randint(0, K, (2, 9)) if task == "classification" else torch.randn(2, 9)
    loss_s, grads_s = stacked.loss_and_gradients(x, y, task)
    loss_g, grads_g = grouped.loss_and_gradients(x, y, task)
    torch.testing.assert_close(loss_s, loss_g)
    for a, b in zip(grads_s, grads_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "layers",
    [
        [nn.Linear(D, 4), nn.GELU(), nn.Linear(4, K)],  # no hand-written derivative
        [nn.Linear(D, 4), nn.Tanh(), nn.Tanh(), nn.Linear(4, K)],  # two activations in a row
        [nn.Linear(D, 4, bias=False), nn.Tanh(), nn.Linear(4, K)],  # no bias
        [nn.Tanh(), nn.Linear(D, K)],  # starts with an activation
    ],
)
def test_stacked_twin_refuses_what_it_cannot_differentiate_by_hand(layers):
    model = nn.Sequential(*layers)
    assert training.hand_differentiable(model) is None
    assert StackedTwin.name not in training._candidates(model)
    with pytest.raises(ValueError):
        StackedTwin(model)
