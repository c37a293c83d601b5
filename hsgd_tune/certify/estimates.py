"""Held-out estimates of a trial's risk, each with its standard error (DESIGN.md §2, "H is also
held-out data").

A twin run trains the same configuration twice: the S-model on S and the reference (H-) model on H.
Neither sees the other's data, so besides the validation set V every trial gets, at no extra training:

- ``val/loss``: the S-model on V;
- ``heldout/loss``: the S-model on H (H is independent of S);
- ``crossfit/loss``: the mean of the S-model on H and the H-model on S, a 2-fold cross-fit of the
  configuration; it estimates the risk of "this configuration trained on n examples", which is what
  picking a configuration is about, from |S| + |H| held-out rows instead of |V|.

Each comes with ``…_se``, and for classification the 0-1 error does too (``…/error``, ``…/error_se``).
What the standard error measures: the spread of the test-set estimate given the trained model(s)
(the per-example losses of a fixed model on independent rows are i.i.d.). It does not include the
variance over training sets, which no estimate from one cross-fit can give without bias (Bengio &
Grandvalet 2004); the two folds of the cross-fit are treated as independent estimates.

The statistics are pure NumPy functions (:func:`mean_se`, :func:`crossfit_mean_se`,
:func:`pooled_mean_se`), tested against a naive computation; :func:`heldout_estimates` is the one
torch-side step, which evaluates the two final models of a :class:`~hsgd_tune.train.twin.TwinRun`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from hsgd_tune.data.datasets import Dataset, Split
from hsgd_tune.train.models import load_flat_parameters
from hsgd_tune.train.twin import H_RUN, TwinRun, per_example_error, per_example_loss

# ---------------------------------------------------------------------------------------------
# Statistics on per-example arrays (pure NumPy)
# ---------------------------------------------------------------------------------------------


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean of the per-example values (n,) and its standard error sd(ddof=1)/√n (NaN for n < 2)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) == 0:
        raise ValueError("mean_se needs at least one value, got an empty array")
    if len(values) < 2:
        return float(values[0]), math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def crossfit_mean_se(fold_a: np.ndarray, fold_b: np.ndarray) -> tuple[float, float]:
    """The cross-fit estimate ``(m_a + m_b)/2`` of two folds' per-example values (n_a,), (n_b,),
    and its standard error ``½·√(se_a² + se_b²)`` (the folds as independent estimates).

    The folds are averaged with equal weights, whatever their sizes: each estimates the risk of the
    same configuration trained on a split of the same size.
    """
    mean_a, se_a = mean_se(fold_a)
    mean_b, se_b = mean_se(fold_b)
    return 0.5 * (mean_a + mean_b), 0.5 * math.sqrt(se_a**2 + se_b**2)


def pooled_mean_se(*parts: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of all parts' per-example values as one sample: what a plain
    search that validates one model on the union of several held-out splits (V ∪ H) computes."""
    return mean_se(np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts]))


# ---------------------------------------------------------------------------------------------
# The trial's estimates
# ---------------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """Per-example losses and errors of a trial's final models on the splits they did not see.

    Each array is (n,) for the split named; ``reference_on_train`` is None when the H-model's
    final weights were not kept (``skipped`` says why).
    """

    task: str
    val: tuple[np.ndarray, np.ndarray]  # S-model on V: (loss, error)
    heldout: tuple[np.ndarray, np.ndarray]  # S-model on H
    reference_on_train: tuple[np.ndarray, np.ndarray] | None  # H-model on S
    skipped: dict[str, str] = field(default_factory=dict)  # metric prefix → reason it is missing

    def metrics(self) -> dict[str, float]:
        """``val/loss_se``, ``heldout/loss`` (+ ``_se``), ``crossfit/loss`` (+ ``_se``), and the same
        for the 0-1 error when the task is classification. ``val/loss`` itself is the training
        code's (the same mean); its standard error is added here."""
        kinds = ("loss", "error") if self.task == "classification" else ("loss",)
        out: dict[str, float] = {}
        for i, kind in enumerate(kinds):
            out[f"val/{kind}_se"] = mean_se(self.val[i])[1]
            out[f"heldout/{kind}"], out[f"heldout/{kind}_se"] = mean_se(self.heldout[i])
            if self.reference_on_train is not None:
                crossfit = crossfit_mean_se(self.heldout[i], self.reference_on_train[i])
                out[f"crossfit/{kind}"], out[f"crossfit/{kind}_se"] = crossfit
        return {k: v for k, v in out.items() if math.isfinite(v)}  # NaN is never logged

    def tags(self) -> dict[str, str]:
        return {f"hsgd.skipped.{name}": reason for name, reason in self.skipped.items()}


def final_weights(run: TwinRun) -> tuple[np.ndarray | None, str]:
    """(2, p) final weights of both runs, or None and why not: the recorded trajectories are JL
    sketches (``sketch_above``) and the full last iterates were not kept."""
    if run.last_iterates is not None:
        return run.last_iterates, ""
    if not run.sketch_dim:
        return run.trajectories[:, -1], ""
    return None, (
        f"the reference model's final weights were recorded only as a {run.sketch_dim}-dimensional "
        "JL sketch (sketch_above), so the H-model cannot be evaluated on S"
    )


def heldout_estimates(data: Dataset, run: TwinRun) -> HeldOut:
    """Evaluate the S-model on V and H and, when its weights were kept, the H-model on S."""
    s_model = run.model.cpu()
    weights, reason = final_weights(run)
    reference = None
    if weights is not None:
        h_model = copy.deepcopy(s_model)
        load_flat_parameters(h_model, torch.as_tensor(weights[H_RUN]))
        reference = per_example(h_model, data.train, data.task)
    skipped = {} if reference is not None else {"crossfit": reason}
    return HeldOut(
        task=data.task,
        val=per_example(s_model, data.val, data.task),
        heldout=per_example(s_model, data.reference, data.task),
        reference_on_train=reference,
        skipped=skipped,
    )


def per_example(model: torch.nn.Module, split: Split, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-example (loss, error) of ``model`` on ``split``: (n,), (n,) float64."""
    x = torch.as_tensor(split.x)
    y = torch.as_tensor(split.y)
    y = y.long() if task == "classification" else y.float()
    with torch.no_grad():
        out = model(x)
        loss, error = per_example_loss(out, y, task), per_example_error(out, y, task)
    return loss.double().numpy(), error.double().numpy()


__all__ = [
    "HeldOut",
    "crossfit_mean_se",
    "final_weights",
    "heldout_estimates",
    "mean_se",
    "per_example",
    "pooled_mean_se",
]
