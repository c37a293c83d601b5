"""A study's trials as rows: the table with Pareto ranks, one finished trial, one line per trial."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from hsgd_tune.errors import HsgdError
from hsgd_tune.search.study import FAIL_REASON

CERTIFICATE = "certificate/bound"


#: Bound terms shown next to the objectives (from the trials' user attributes).
BOUND_COLUMNS = (
    "bound/decoupling_distance",
    "bound/lipschitz_pop",
    "bound/complexity",
    "bound/gap_bound",
    "bound/risk_bound",
)


#: Estimates shown next to the objectives when they are not objectives themselves (user attributes).
ESTIMATE_COLUMNS = {"val_loss": "val/loss", "crossfit_loss": "crossfit/loss"}


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, sampled params, objectives, bound terms, Pareto rank."""
    objectives = study.user_attrs.get("objectives") or [
        f"objective_{i}" for i in range(len(study.directions))
    ]
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"trial": t.number, "state": t.state.name, **t.params}
        values = t.values if t.state == TrialState.COMPLETE else [np.nan] * len(objectives)
        row.update(dict(zip(objectives, values, strict=True)))
        row.update(
            {
                col: t.user_attrs.get(col, np.nan)
                for col in BOUND_COLUMNS
                if col.split("/")[1] not in objectives
            }
        )
        row.update(
            {col: t.user_attrs.get(col, np.nan) for n, col in ESTIMATE_COLUMNS.items() if n not in objectives}
        )
        row["fail_reason"] = t.user_attrs.get(FAIL_REASON, "")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["pareto_rank"] = pareto_ranks(table[objectives].to_numpy(dtype=float))
    return table.sort_values(["pareto_rank", objectives[0], "trial"], na_position="last").reset_index(
        drop=True
    )


def pareto_ranks(values: np.ndarray) -> np.ndarray:
    """Non-dominated sorting for minimisation: rank 1 is the front, rank 2 the front of the rest...

    values (n, m); rows with any NaN (unfinished trials) get rank 0, meaning "not ranked".
    """
    n = len(values)
    ranks = np.zeros(n, dtype=int)
    remaining = [i for i in range(n) if np.isfinite(values[i]).all()]
    rank = 1
    while remaining:
        front = [i for i in remaining if not any(_dominates(values[j], values[i]) for j in remaining)]
        ranks[front] = rank
        remaining = [i for i in remaining if i not in set(front)]
        rank += 1
    return ranks


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """a dominates b: no worse in every objective and better in one."""
    return bool(np.all(a <= b) and np.any(a < b))


def finished_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number`` of ``study``; one clear error if the study has none, or it did not finish."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    name = study.study_name
    if number not in trials:
        raise HsgdError(f"study {name!r} has no trial {number} (trials are 0 to {len(trials) - 1})")
    if trials[number].state != TrialState.COMPLETE:
        state = trials[number].state.name
        raise HsgdError(f"trial {number} of study {name!r} did not finish (state {state})")
    return trials[number]


def describe_trial(trial: FrozenTrial, objectives: tuple[str, ...]) -> str:
    params = "  ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    if trial.state == TrialState.COMPLETE:
        scores = "  ".join(f"{k}={v:.4g}" for k, v in zip(objectives, trial.values, strict=True))
    else:
        scores = f"{trial.state.name}: {trial.user_attrs.get(FAIL_REASON, 'no reason recorded')}"
    return f"trial {trial.number:4d}  {params}  {scores}"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
