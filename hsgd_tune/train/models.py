"""Built-in models and user entry points.

Every model is an ``nn.Module`` so it can be saved, rebuilt and served. The built-in ones (an MLP with
ReLU, a linear model, a small CNN for rows that are images) are also known layer by layer, which lets
:mod:`hsgd_tune.train.twin` advance the empirical and the reference run in one batched pass (stacked
weights, grouped convolutions) instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hsgd_tune.errors import ConfigError
from hsgd_tune.studyfile.config import ModelConfig, import_entry_point


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: saved with each trial's final weights."""

    kind: str  # "mlp" | "linear" | "cnn" | "entry_point"
    n_features: int
    n_outputs: int
    widths: tuple[int, ...] = ()
    entry_point: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()  # knobs passed to a user entry point
    channels: tuple[int, ...] = ()  # cnn: output channels of each conv block
    image_shape: tuple[int, ...] = ()  # cnn: (channels, height, width) of one row
    kernel_size: int = 3  # cnn

    @property
    def is_builtin(self) -> bool:
        """A Linear/ReLU stack (training.StackedTwin steps it by hand)."""
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
            **(self._cnn_dict() if self.kind == "cnn" else {}),
        }

    def _cnn_dict(self) -> dict[str, Any]:
        shape = {"channels": list(self.channels), "image_shape": list(self.image_shape)}
        return {**shape, "kernel_size": self.kernel_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(
            kind=d["kind"],
            n_features=d["n_features"],
            n_outputs=d["n_outputs"],
            widths=tuple(d.get("widths", ())),
            entry_point=d.get("entry_point"),
            kwargs=tuple(sorted(d.get("kwargs", {}).items())),
            channels=tuple(d.get("channels", ())),
            image_shape=tuple(d.get("image_shape", ())),
            kernel_size=int(d.get("kernel_size", 3)),
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
        channels=cfg.channels,
        image_shape=cfg.image_shape,
        kernel_size=cfg.kernel_size,
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
    if spec.kind == "cnn":
        return build_cnn(spec)
    return _call_entry_point(spec)


def build_cnn(spec: ModelSpec) -> nn.Sequential:
    """Rows as images: Unflatten to (c, h, w), then per entry of ``channels`` a block Conv2d (same
    padding) → ReLU → MaxPool2d(2), then Flatten → Linear to the outputs."""
    c, h, w = spec.image_shape
    if c * h * w != spec.n_features:
        raise ConfigError(
            "model.image_shape",
            f"must hold the data's {spec.n_features} features per row (c × h × w = {c * h * w})",
            list(spec.image_shape),
        )
    layers: list[nn.Module] = [nn.Unflatten(1, (c, h, w))]
    for out in spec.channels:
        conv = nn.Conv2d(c, out, spec.kernel_size, padding=spec.kernel_size // 2)
        layers += [conv, nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, spec.n_outputs)]
    return nn.Sequential(*layers)


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
