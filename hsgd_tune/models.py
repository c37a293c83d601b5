"""Built-in models and user entry points.

Every model is an ``nn.Module`` so it can be saved, rebuilt and served. The built-in ones (an MLP with
ReLU, or a linear model) are also known layer by layer, which lets :mod:`hsgd_tune.training` advance
the empirical and the reference run in one batched pass (stacked weights) instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hsgd_tune.config import ModelConfig, import_entry_point
from hsgd_tune.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: saved with each trial's final weights."""

    kind: str  # "mlp" | "linear" | "entry_point"
    n_features: int
    n_outputs: int
    widths: tuple[int, ...] = ()
    entry_point: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()  # knobs passed to a user entry point

    @property
    def is_builtin(self) -> bool:
        return self.kind in ("mlp", "linear")

    def layer_sizes(self) -> tuple[int, ...]:
        """(d, h1, ..., k) for the built-in models."""
        return (self.n_features, *self.widths, self.n_outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n_features": self.n_features,
            "n_outputs": self.n_outputs,
            "widths": list(self.widths),
            "entry_point": self.entry_point,
            "kwargs": dict(self.kwargs),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(
            kind=d["kind"],
            n_features=d["n_features"],
            n_outputs=d["n_outputs"],
            widths=tuple(d.get("widths", ())),
            entry_point=d.get("entry_point"),
            kwargs=tuple(sorted(d.get("kwargs", {}).items())),
        )


def model_spec(cfg: ModelConfig, n_features: int, n_outputs: int, knobs: dict[str, Any]) -> ModelSpec:
    """The spec of a trial's model; knobs that are not training knobs go to a user entry point."""
    widths = cfg.widths if cfg.kind == "mlp" else ()
    return ModelSpec(
        kind=cfg.kind,
        n_features=n_features,
        n_outputs=n_outputs,
        widths=tuple(widths),
        entry_point=cfg.entry_point,
        kwargs=tuple(sorted(knobs.items())),
    )


def build_model(spec: ModelSpec) -> nn.Module:
    """A fresh model, initialised from torch's current random state."""
    if spec.is_builtin:
        sizes = spec.layer_sizes()
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            if i > 0:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(d_in, d_out))
        return nn.Sequential(*layers)
    return _call_entry_point(spec)


def _call_entry_point(spec: ModelSpec) -> nn.Module:
    factory = import_entry_point(spec.entry_point)  # a failing user module: one ConfigError
    model = factory(spec.n_features, spec.n_outputs, **dict(spec.kwargs))
    if not isinstance(model, nn.Module):
        raise ConfigError(
            "model.entry_point",
            "must return a torch.nn.Module from (n_features, n_outputs, **knobs)",
            type(model).__name__,
        )
    return model


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """The nn.Linear layers of a built-in model, in order."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters as one vector, in ``named_parameters`` order: the coordinates of a trajectory."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def load_flat_parameters(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Write a vector made by :func:`flat_parameters` back into ``model`` (in place)."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
