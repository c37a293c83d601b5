"""An entry-point model for the benchmarks: ``[model] entry_point = "benchmarks.user_models:tanh_mlp"``.

A tanh MLP is outside the built-in Linear/ReLU stack, so its twin is stepped by torch.func's vmap or as
two modules (training.choose_twin measures which is faster), and its gradient norms take the vmap path.
"""

from __future__ import annotations

from torch import nn


def tanh_mlp(n_features: int, n_outputs: int, width: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(n_features, width),
        nn.Tanh(),
        nn.Linear(width, width),
        nn.Tanh(),
        nn.Linear(width, n_outputs),
    )
