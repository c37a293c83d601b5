"""A user's model, tried before the study exists: built, one batch forward and backward, output size.

A model entry point is the user's code; whatever it does wrong (a wrong input or output size, no
parameters, a ``forward`` that raises, a knob it does not take) must show as one line naming the
entry point and the problem, before any Optuna study or MLflow run is created. A wrong output size
would otherwise train silently (13 logits for 10 classes is a valid cross-entropy).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from hsgd_tune.data.datasets import Dataset
from hsgd_tune.errors import ConfigError
from hsgd_tune.studyfile.config import NOISE_KNOBS, TRAINING_KNOBS, Knob, StudyConfig, import_entry_point
from hsgd_tune.train.models import count_parameters, model_spec
from hsgd_tune.train.twin import initial_model, per_example_loss

KEY = "model.entry_point"


def check_model(cfg: StudyConfig, data: Dataset) -> int:
    """Raise a ConfigError when the study's model cannot train on its data (any model kind; the
    built-in ones pass by construction, so this costs them one tiny forward pass). Returns the
    model's number of parameters."""
    with torch.enable_grad():  # the caller may be inside torch.no_grad(); the check needs a backward
        return _check(cfg, data)


def _check(cfg: StudyConfig, data: Dataset) -> int:
    knobs = model_knobs(cfg)
    spec_text = cfg.model.entry_point
    if spec_text is not None:
        _check_signature(spec_text, knobs)
    spec = model_spec(cfg.model, data.n_features, data.n_outputs, knobs)
    try:
        model = initial_model(spec, cfg.seed)
    except ConfigError:
        raise
    except (Exception, SystemExit) as exc:  # the user's factory failed
        raise ConfigError(KEY, f"must build a model ({_reason(exc)})", spec_text) from None
    if count_parameters(model) == 0 or not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(KEY, "must build a model with trainable parameters (it has none)", spec_text)
    batch = min(len(data.train.y), 4)
    x = torch.as_tensor(data.train.x[:batch], dtype=torch.float32)
    y = torch.as_tensor(data.train.y[:batch])
    y = y.long() if data.task == "classification" else y.float()
    try:
        out = model(x)
    except (Exception, SystemExit) as exc:
        rule = f"must run forward on a batch of shape {tuple(x.shape)} ({_reason(exc)})"
        raise ConfigError(KEY, rule, spec_text) from None
    expected = (batch, data.n_outputs)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = f"{data.n_outputs} classes" if data.task == "classification" else "regression"
        rule = f"must output shape {expected} for a batch of {batch} ({what}), not {got}"
        raise ConfigError(KEY, rule, spec_text) from None
    try:
        per_example_loss(out, y, data.task).mean().backward()
    except (Exception, SystemExit) as exc:
        raise ConfigError(KEY, f"must run backward from the loss ({_reason(exc)})", spec_text) from None
    if all(p.grad is None for p in model.parameters()):
        raise ConfigError(KEY, "must build a model whose output depends on its parameters", spec_text)
    return count_parameters(model)


def model_knobs(cfg: StudyConfig) -> dict[str, Any]:
    """The knobs a trial passes to the model, each at a value it may take (its first choice or low)."""
    trainer = ("learning_rate", "batch_size", *TRAINING_KNOBS, *NOISE_KNOBS)
    return {k.name: _example(k) for k in cfg.search.knobs if k.name not in trainer}


def _example(knob: Knob) -> Any:
    if knob.kind == "categorical":
        return knob.choices[0]
    return int(knob.low) if knob.kind == "int" else float(knob.low)


def _check_signature(spec: str, knobs: dict[str, Any]) -> None:
    """Every searched knob must be a parameter of the factory (named in the error, not a TypeError)."""
    factory = import_entry_point(spec)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: no signature to check, calling tells
        return
    for name in knobs:
        try:
            signature.bind_partial(1, 1, **{name: knobs[name]})
        except TypeError:
            rule = f"is a knob the entry point {spec} does not accept (its parameters: {signature})"
            raise ConfigError(f"search.knobs.{name}", rule, name) from None
    try:
        signature.bind(1, 1, **knobs)
    except TypeError as exc:
        rule = f"must accept (n_features, n_outputs, **knobs) ({exc})"
        raise ConfigError(KEY, rule, spec) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"
