"""An entry-point model for the benchmarks: ``[model] entry_point = "benchmarks.user_models:tanh_mlp"``.

A tanh MLP is outside the built-in Linear/ReLU stack: its twin is whichever of the hand-differentiated
stack, the grouped pass, torch.func's vmap or two modules ``choose_twin`` (train/twin.py) measures
fastest (the stack, on these machines), and its per-example gradient norms take the closed form of
any grouping plan (``plan_gradient_norms``).
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
