"""The CUDA path (issue #17): every kind of twin trains on a GPU to what it trains on the CPU and to
two sequential plain runs there, with the same checks as tests/test_lockstep.py. Skipped without a GPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_lockstep import CNN, make_data, plain_sgd, settings

from hsgd_tune.train import twin as training
from hsgd_tune.train.models import ModelSpec
from hsgd_tune.train.twin import (
    H_RUN,
    S_RUN,
    FuncTwin,
    GroupedTwin,
    SequentialTwin,
    grouping_plan,
    initial_model,
    resolve_device,
    train_twin,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

MLP = ModelSpec("mlp", CNN.n_features, CNN.n_outputs, widths=(8, 6))


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 (cuDNN's default for convolutions) rounds inputs to 10 bits: off, so GPU and CPU agree."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_cuda_is_used_when_asked_for():
    assert resolve_device("cuda").type == "cuda" and resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("spec", [MLP, CNN], ids=["stacked-mlp", "grouped-cnn"])
def test_builtin_twins_on_cuda_equal_the_cpu_and_two_plain_runs(spec):
    data = make_data()
    cpu = train_twin(data, spec, settings())
    gpu = train_twin(data, spec, settings(device="cuda"))
    assert gpu.twin == cpu.twin
    np.testing.assert_allclose(gpu.trajectories, cpu.trajectories, rtol=0, atol=1e-4)
    np.testing.assert_allclose(gpu.grad_norms, cpu.grad_norms, rtol=1e-4, atol=1e-5)
    model, s = initial_model(spec, 3), settings()
    np.testing.assert_allclose(
        gpu.trajectories[S_RUN], plain_sgd(model, data.train, s, 96), rtol=0, atol=1e-4
    )
    np.testing.assert_allclose(
        gpu.trajectories[H_RUN], plain_sgd(model, data.reference, s, 96), rtol=0, atol=1e-4
    )
    assert next(gpu.model.parameters()).device.type == "cpu"  # the final model comes back to the CPU


KINDS = {
    "grouped": lambda m: GroupedTwin(m, grouping_plan(m)),
    "vmap": FuncTwin,
    "sequential": SequentialTwin,
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_user_model_twins_on_cuda_equal_the_cpu(kind, monkeypatch):
    monkeypatch.setattr(training, "choose_twin", lambda model, probe: KINDS[kind](model))
    spec = dataclasses.replace(CNN, kind="entry_point")  # any Sequential; built by build_cnn's layers
    monkeypatch.setattr(training, "initial_model", lambda s, seed: _cnn(seed))
    data = make_data()
    cpu = train_twin(data, spec, settings())
    gpu = train_twin(data, spec, settings(device="cuda"))
    assert gpu.twin == cpu.twin == kind
    np.testing.assert_allclose(gpu.trajectories, cpu.trajectories, rtol=0, atol=1e-4)


def _cnn(seed: int):
    from hsgd_tune.train.models import build_cnn

    torch.manual_seed(seed)
    return build_cnn(CNN)


def test_choice_is_timed_on_the_gpu_with_synchronisation(monkeypatch):
    monkeypatch.setattr(training, "_CHOSEN", {})
    probe = (
        torch.randn(2, 8, CNN.n_features, device="cuda"),
        torch.zeros(2, 8, dtype=torch.long, device="cuda"),
        "classification",
    )
    twin = training.choose_twin(_cnn(0).cuda(), probe)
    assert twin.flat().device.type == "cuda"
