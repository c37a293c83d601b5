"""The registered model's code: raw feature rows in, predictions in the data's own terms out.

This is an MLflow "models from code" file. ``mlflow.pyfunc.log_model(python_model=<this file>, ...)``
copies it into the logged model, and ``mlflow.pyfunc.load_model`` runs it, then hands
:meth:`Champion.load_context` the model's artifacts:

* ``weights``: the torch ``state_dict`` (read with ``torch.load(weights_only=True)``: tensors only);
* ``spec``: the model spec JSON (``hsgd_tune.train.models.ModelSpec.to_dict()``), enough to rebuild it;
* ``preprocessing``: JSON with the feature names, H's means and scales (the study standardised every
  split with them), the original class labels, and the regression target's mean and scale.

No Python object is pickled anywhere. The file imports only numpy, pandas, torch and mlflow, so a
production process needs neither hsgd_tune nor the study's data; only a model built by a user entry
point needs that entry point's module to be importable.

``predict`` takes a pandas DataFrame with the study's feature names (any column order), or an array
(n, d) with the columns in that order, and returns a DataFrame: ``prediction`` (the original class
label, or the regression output in the target's units) and, for classification, one
``probability[<label>]`` column per class (softmax of the logits). The torch module is
``load_model(...).unwrap_python_model().module``; it expects standardised float32 rows, as in training.
"""

from __future__ import annotations

import importlib
import json

import mlflow
import numpy as np
import pandas as pd
import torch
from torch import nn


def build_module(spec: dict) -> nn.Module:
    """The network described by ``spec``, with the parameter names ``hsgd_tune.train.models.build_model``
    gives it (so its ``state_dict`` loads). Built-in kinds are rebuilt here, so that serving needs no
    hsgd_tune; a user entry point is imported and called as in training."""
    if spec["kind"] in ("mlp", "linear"):
        sizes = [spec["n_features"], *spec.get("widths", []), spec["n_outputs"]]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            if i > 0:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(d_in, d_out))
        return nn.Sequential(*layers)
    if spec["kind"] == "entry_point":
        module_name, _, attr = spec["entry_point"].partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        return factory(spec["n_features"], spec["n_outputs"], **spec.get("kwargs", {}))
    # A kind added to hsgd_tune after this file was written: its builder, where hsgd_tune is installed.
    from hsgd_tune.train.models import ModelSpec, build_model

    return build_model(ModelSpec.from_dict(spec))


def _numbers(name: str, column: pd.Series) -> np.ndarray:
    """A feature column as float64; a value that is not a finite number is an error naming it."""
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(
            f"feature column {name!r} must hold finite numbers (row {row}: {column.iloc[row]!r})"
        )
    return values


def probability_column(label) -> str:
    return f"probability[{label}]"


class Champion(mlflow.pyfunc.PythonModel):
    """Standardise with H's statistics, run the network, map outputs back to labels or units."""

    def load_context(self, context) -> None:
        with open(context.artifacts["preprocessing"], encoding="utf-8") as f:
            prep = json.load(f)
        with open(context.artifacts["spec"], encoding="utf-8") as f:
            spec = json.load(f)
        self.task = prep["task"]
        self.feature_names = list(prep["feature_names"])
        self.x_mean = np.asarray(prep["x_mean"], dtype=np.float64)
        self.x_scale = np.asarray(prep["x_scale"], dtype=np.float64)
        self.classes = pd.Series(prep["classes"])  # keeps the labels' own type: int, str, bool
        self.y_mean, self.y_scale = float(prep["y_mean"]), float(prep["y_scale"])
        self.module = build_module(spec)
        self.module.load_state_dict(torch.load(context.artifacts["weights"], weights_only=True))
        self.module.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        x = self._raw_matrix(model_input)
        # As data/datasets.py did for every split: float64 arithmetic with H's statistics, then float32.
        z = np.ascontiguousarray((x - self.x_mean) / self.x_scale, dtype=np.float32)
        with torch.no_grad():
            out = self.module(torch.from_numpy(z)).double().numpy()
        if self.task == "regression":
            return pd.DataFrame({"prediction": out[:, 0] * self.y_scale + self.y_mean})
        proba = torch.softmax(torch.from_numpy(out), dim=1).numpy()
        frame = pd.DataFrame({"prediction": self.classes.iloc[out.argmax(axis=1)].to_numpy()})
        for k, label in enumerate(self.classes):
            frame[probability_column(label)] = proba[:, k]
        return frame

    def _raw_matrix(self, model_input) -> np.ndarray:
        """(n, d) float64 in the study's column order, from a DataFrame (by name) or an array."""
        if isinstance(model_input, pd.DataFrame):
            missing = [c for c in self.feature_names if c not in model_input.columns]
            if missing:
                raise ValueError(f"model input lacks the feature columns {missing}")
            columns = [_numbers(name, model_input[name]) for name in self.feature_names]
            return np.stack(columns, axis=1) if columns else np.empty((len(model_input), 0))
        x = np.asarray(model_input, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ValueError(
                f"model input must be rows of {len(self.feature_names)} features "
                f"({', '.join(self.feature_names[:5])}, ...), got shape {x.shape}"
            )
        if not np.isfinite(x).all():
            row, col = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
            raise ValueError(f"feature {self.feature_names[col]!r} must be a finite number (row {row})")
        return x


mlflow.models.set_model(Champion())
