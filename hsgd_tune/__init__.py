"""hsgd_tune: tune SGD's batch size and learning rate, scored by a trajectory generalization bound.

The public API, loaded lazily so that ``import hsgd_tune.bound`` (pure NumPy/SciPy) never pulls in
torch, Optuna or MLflow:

- :func:`load_study` / :class:`StudyConfig` — a study file, validated
- :func:`load_dataset` / :class:`Dataset` — the S / H / V splits
- :func:`train_twin` — the twin SGD run (empirical and reference dynamics)
- :func:`trajectory_bound` — the geometric-decoupling bound on recorded trajectories
- :func:`heldout_estimates` — a twin run's held-out and cross-fit losses, with standard errors
- :func:`evaluate` — one trial without Optuna or MLflow
- :func:`run_study` — a whole study: Optuna + MLflow, resumable
- :func:`trials_table` / :func:`load_ranking` — the ranked trials of a study, and its recommendation
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_study": "hsgd_tune.studyfile.config",
    "StudyConfig": "hsgd_tune.studyfile.config",
    "load_dataset": "hsgd_tune.data.datasets",
    "Dataset": "hsgd_tune.data.datasets",
    "train_twin": "hsgd_tune.train.twin",
    "trajectory_bound": "hsgd_tune.bound",
    "TrajectoryBound": "hsgd_tune.bound",
    "heldout_estimates": "hsgd_tune.certify.estimates",
    "evaluate": "hsgd_tune.search.objective",
    "run_study": "hsgd_tune.search.runner",
    "trials_table": "hsgd_tune.search.trials",
    "load_ranking": "hsgd_tune.advise.ranking",
    "ConfigError": "hsgd_tune.errors",
    "DataError": "hsgd_tune.errors",
    "DivergedError": "hsgd_tune.errors",
    "HsgdError": "hsgd_tune.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hsgd_tune' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
