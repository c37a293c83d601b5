"""Tests for hsgd_tune.train.models: built-in models, specs, flat parameter vectors."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

from hsgd_tune.errors import ConfigError
from hsgd_tune.studyfile.config import ModelConfig
from hsgd_tune.train.models import (
    ModelSpec,
    build_model,
    count_parameters,
    flat_parameters,
    linear_layers,
    load_flat_parameters,
    model_spec,
)


def test_build_mlp_shapes():
    spec = ModelSpec(kind="mlp", n_features=5, n_outputs=3, widths=(7, 4))
    model = build_model(spec)
    layers = linear_layers(model)
    assert [tuple(layer.weight.shape) for layer in layers] == [(7, 5), (4, 7), (3, 4)]
    assert [tuple(layer.bias.shape) for layer in layers] == [(7,), (4,), (3,)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2  # between layers, not after the last
    assert not isinstance(list(model.children())[-1], nn.ReLU)
    assert model(torch.zeros(9, 5)).shape == (9, 3)
    assert count_parameters(model) == 7 * 5 + 7 + 4 * 7 + 4 + 3 * 4 + 3
    assert spec.layer_sizes() == (5, 7, 4, 3)
    assert spec.is_builtin


def test_build_linear_shapes():
    spec = ModelSpec(kind="linear", n_features=5, n_outputs=1)
    model = build_model(spec)
    layers = linear_layers(model)
    assert len(layers) == 1 and tuple(layers[0].weight.shape) == (1, 5)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert model(torch.zeros(4, 5)).shape == (4, 1)


def test_model_spec_from_config_drops_widths_for_linear_and_sorts_knobs():
    spec = model_spec(ModelConfig(kind="mlp", widths=(8, 8)), 4, 2, {"b": 2, "a": 1})
    assert spec.widths == (8, 8) and spec.kwargs == (("a", 1), ("b", 2))
    assert model_spec(ModelConfig(kind="linear", widths=()), 4, 2, {}).widths == ()


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(kind="mlp", n_features=64, n_outputs=10, widths=(32, 16)),
        ModelSpec(kind="linear", n_features=3, n_outputs=1),
        ModelSpec(
            kind="entry_point",
            n_features=3,
            n_outputs=2,
            entry_point="pkg.mod:factory",
            kwargs=(("depth", 3), ("dropout", 0.1), ("name", "x")),
        ),
    ],
)
def test_model_spec_dict_round_trip_through_json(spec):
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_flat_and_load_flat_round_trip():
    spec = ModelSpec(kind="mlp", n_features=5, n_outputs=3, widths=(6,))
    torch.manual_seed(0)
    a = build_model(spec)
    torch.manual_seed(1)
    b = build_model(spec)
    flat = flat_parameters(a)
    assert flat.shape == (count_parameters(a),)
    # named_parameters order: layer 0 weight, layer 0 bias, layer 2 weight, layer 2 bias.
    expected = torch.cat([p.detach().reshape(-1) for _, p in a.named_parameters()])
    torch.testing.assert_close(flat, expected, rtol=0, atol=0)
    assert not torch.equal(flat_parameters(b), flat)

    assert load_flat_parameters(b, flat) is b
    torch.testing.assert_close(flat_parameters(b), flat, rtol=0, atol=0)
    x = torch.randn(4, 5)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    # The flat vector is a copy: changing it later leaves the model alone.
    flat += 1.0
    assert not torch.equal(flat_parameters(b), flat)


def test_entry_point_model(tmp_path, monkeypatch):
    (tmp_path / "models_test_user.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def net(n_features, n_outputs, width=4):
                return nn.Sequential(nn.Linear(n_features, width), nn.Tanh(), nn.Linear(width, n_outputs))

            def not_a_module(n_features, n_outputs):
                return "oops"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = ModelSpec(
        kind="entry_point",
        n_features=3,
        n_outputs=2,
        entry_point="models_test_user:net",
        kwargs=(("width", 5),),
    )
    assert not spec.is_builtin
    model = build_model(spec)
    assert model(torch.zeros(2, 3)).shape == (2, 2)
    assert count_parameters(model) == 3 * 5 + 5 + 5 * 2 + 2

    bad = ModelSpec(
        kind="entry_point", n_features=3, n_outputs=2, entry_point="models_test_user:not_a_module"
    )
    with pytest.raises(ConfigError, match="model.entry_point"):
        build_model(bad)
