"""What the correlation and selection benchmarks share: configs, one grid of trials, losses per iterate.

The benchmarks use the package's own pieces (``parse_study``, ``load_dataset``, ``evaluate``) and no
Optuna or MLflow: a benchmark is a fixed lr × batch-size grid, not a search, and nothing needs logging.
Every trial of a grid uses the study seed for its initialisation and minibatches (common random
numbers, as in a study); "several seeds" means several studies, each with its own seed, hence its own
splits, initialisation and minibatch order.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import hsgd_tune
from hsgd_tune.data.datasets import Dataset, DataWarning, Split, load_dataset
from hsgd_tune.errors import DivergedError
from hsgd_tune.search.objective import TrialOutcome, evaluate
from hsgd_tune.studyfile.config import StudyConfig, parse_study
from hsgd_tune.train.models import build_model, load_flat_parameters
from hsgd_tune.train.twin import S_RUN, per_example_error, per_example_loss

RESULTS = Path(__file__).resolve().parent / "results"

#: The task of each benchmark dataset. Digits: 1797 rows, so S = H = 500, V = 200 and T = the 597
#: rows left. Synthetic: a teacher network with 10% label noise and an (almost) unlimited test split.
DATASETS = {
    "digits": {"source": "digits", "n_train": 500, "n_reference": 500, "n_val": 200, "n_test": 597},
    "synthetic": {
        "source": "synthetic",
        "n_train": 500,
        "n_reference": 500,
        "n_val": 200,
        "n_test": 20000,
        "synthetic": {"kind": "teacher", "n_features": 20, "n_classes": 3, "noise": 0.1},
    },
}


@dataclass(frozen=True)
class Budget:
    """How long each trial trains, and how many seeds; ``--quick`` shrinks both."""

    steps: int
    record_every: int
    seeds: int
    n_test_synthetic: int
    #: Compute the PAC-Bayes certificate and the tail index too (package defaults). They cost several
    #: times the training itself, so the selection benchmark, which needs only the risk bound, and the
    #: quick modes leave them off. The analytic (Gronwall) bounds are always off here: vacuous for
    #: runs this long (DESIGN.md §2) and a few seconds each.
    extras: bool = False


def study_config(dataset: str, seed: int, budget: Budget, n_trials: int) -> StudyConfig:
    """The study a grid stands for: its search space is the grid itself, so δ is divided over the
    grid's configurations like a study's would be (|Λ| = 24)."""
    data = dict(DATASETS[dataset])
    if dataset == "synthetic":
        data["n_test"] = budget.n_test_synthetic
    raw = {
        "name": f"bench-{dataset}",
        "seed": seed,
        "data": data,
        "model": {"kind": "mlp", "widths": [64, 64]},
        "search": {
            "learning_rate": {"choices": list(LEARNING_RATES)},
            "batch_size": {"choices": list(BATCH_SIZES)},
        },
        "training": {"steps": budget.steps, "record_every": budget.record_every},
        "certificate": {"enabled": budget.extras},
        # evaluate() measures inside the trial only when asked to: these grids compare every trial's
        # certificate and tail index, not just a Pareto front's.
        "diagnostics": {
            "tail_index": budget.extras,
            "analytic": False,
            "trials": "all" if budget.extras else "front",
        },
        "run": {"n_trials": n_trials},
    }
    return parse_study(raw, Path.cwd())


def load_data(cfg: StudyConfig) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # digits: H gets the rows left, announced above
        return load_dataset(cfg.data, cfg.seed)


def run_trial(cfg: StudyConfig, data: Dataset, lr: float, batch_size: int) -> TrialOutcome | None:
    """One trial of the grid; None when it diverges (it then counts as a failed trial)."""
    try:
        return evaluate(cfg, data, {"learning_rate": lr, "batch_size": batch_size})
    except DivergedError:
        return None


def split_tensors(split: Split, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(split.x)
    y = torch.as_tensor(split.y)
    return x, (y.long() if task == "classification" else y.float())


def per_example(outcome: TrialOutcome, split: Split, task: str, iterate: int = -1) -> tuple[np.ndarray, ...]:
    """Per-example (loss, error) of the S-run's iterate ``iterate`` on ``split``: (n,), (n,)."""
    model = build_model(outcome.spec)
    load_flat_parameters(model, torch.as_tensor(outcome.run.trajectories[S_RUN, iterate]))
    x, y = split_tensors(split, task)
    with torch.no_grad():
        out = model(x)
        return per_example_loss(out, y, task).numpy(), per_example_error(out, y, task).numpy()


def gap_per_iterate(outcome: TrialOutcome, data: Dataset) -> np.ndarray:
    """(N,) test loss − full train loss of every recorded S-run iterate (not the minibatch loss)."""
    n_points = outcome.run.trajectories.shape[1]
    gaps = np.empty(n_points)
    for k in range(n_points):
        train = per_example(outcome, data.train, data.task, k)[0].mean()
        test = per_example(outcome, data.test, data.task, k)[0].mean()
        gaps[k] = test - train
    return gaps


def weight_baselines(outcome: TrialOutcome) -> dict[str, float]:
    """Final weight norm and distance from initialisation of the S-run (Jiang et al.'s baselines)."""
    traj = outcome.run.trajectories[S_RUN].astype(np.float64)
    return {
        "weight_norm": float(np.linalg.norm(traj[-1])),
        "dist_from_init": float(np.linalg.norm(traj[-1] - traj[0])),
    }


#: Metric namespaces of measures beyond the trajectory bound (PAC-Bayes certificate, tail index, ...).
EXTRA_PREFIXES = ("certificate/", "tail/", "analytic/", "fractal/")


def extra_measures(metrics: dict[str, float]) -> dict[str, float]:
    """Measures other engineers add to ``TrialOutcome.metrics()``: found by key, so tables extend."""
    return {k: v for k, v in metrics.items() if k.startswith(EXTRA_PREFIXES)}


#: The grid both benchmarks run: 6 learning rates × 4 batch sizes (the issue's minimum).
LEARNING_RATES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
BATCH_SIZES = (8, 16, 32, 64)


def grid(dataset: str, seed: int, budget: Budget, log=print) -> pd.DataFrame:
    """Every trial of the lr × b grid for one seed: one row each, cached on disk.

    The row holds what both benchmarks need: the measures (bound terms, extra metrics, baselines),
    the observed gaps (final and max over recorded iterates), test loss/error of the final S-model,
    and its per-example validation losses (an array, for the selection rule's standard error).
    Diverged trials are kept as rows with ``diverged=True`` and NaN elsewhere. The cache key is the
    study fingerprint and the grid, so the correlation and selection benchmarks share trials; delete
    ``benchmarks/results/cache`` after changing the package.
    """
    n_trials = len(LEARNING_RATES) * len(BATCH_SIZES)
    cfg = study_config(dataset, seed, budget, n_trials)
    key = f"{dataset}-s{seed}-{cfg.fingerprint()}-{CODE_VERSION}"
    path = RESULTS / "cache" / f"{key}.pkl"
    if path.exists():
        return pd.read_pickle(path)
    data = load_data(cfg)
    rows = []
    for lr in LEARNING_RATES:
        for b in BATCH_SIZES:
            started = time.perf_counter()
            rows.append(trial_row(cfg, data, lr, b))
            log(f"  {dataset} seed {seed} lr {lr:g} b {b}: {time.perf_counter() - started:.1f} s")
    table = pd.DataFrame(rows)
    table.insert(0, "seed", seed)
    table.insert(0, "dataset", dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_pickle(path)
    return table


def code_version() -> str:
    """Hash of the grid and of the package's source: a cached trial is reused only if both match."""
    digest = hashlib.sha256(repr((LEARNING_RATES, BATCH_SIZES)).encode())
    package = Path(hsgd_tune.__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


#: Taken when the benchmark starts, i.e. when the package it runs was imported.
CODE_VERSION = code_version()


def trial_row(cfg: StudyConfig, data: Dataset, lr: float, b: int) -> dict:
    outcome = run_trial(cfg, data, lr, b)
    if outcome is None:
        return {"learning_rate": lr, "batch_size": b, "diverged": True}
    metrics = outcome.metrics()
    val_losses = per_example(outcome, data.val, data.task)[0]
    test_loss, test_error = (v.mean() for v in per_example(outcome, data.test, data.task))
    gaps = gap_per_iterate(outcome, data)
    return {
        "learning_rate": lr,
        "batch_size": b,
        "diverged": False,
        "train_loss": metrics["train/loss"],
        "test_loss": float(test_loss),
        "test_error": float(test_error),
        "gap_final": float(gaps[-1]),
        "gap_traj": float(gaps.max()),
        "val_losses": val_losses,
        **{k: v for k, v in metrics.items() if k.startswith("bound/")},
        **extra_measures(metrics),
        "lr_over_b": lr / b,
        **weight_baselines(outcome),
        "val_loss": metrics["val/loss"],
        "seconds": sum(outcome.run.seconds.values()),
    }


def use_one_thread() -> None:
    # Two cores shared with other jobs: one torch thread per process avoids oversubscription, which
    # made trials several times slower when measured.
    torch.set_num_threads(1)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPU cores, "
        f"Python {sys.version.split()[0]}, torch {torch.__version__} (1 thread)"
    )


def header(title: str, command: str, seconds: float) -> str:
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"{title}\n\n- date: {now}\n- machine: {machine()}\n- command: `{command}`\n"
        f"- wall time: {seconds / 60:.1f} min\n"
    )


def markdown(df: pd.DataFrame, floatfmt: str = "{:.2f}") -> str:
    """A DataFrame as a GitHub table (no tabulate dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = [floatfmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class Clock:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started
