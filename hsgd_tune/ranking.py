"""The trials of a study as a pandas table, with Pareto ranks over the study's objectives."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from hsgd_tune.study import FAIL_REASON

#: Bound terms shown next to the objectives (from the trials' user attributes).
BOUND_COLUMNS = ("bound/decoupling_distance", "bound/lipschitz", "bound/complexity", "bound/gap_bound", "bound/risk_bound")


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, sampled params, objectives, bound terms, Pareto rank."""
    objectives = study.user_attrs.get("objectives") or [f"objective_{i}" for i in range(len(study.directions))]
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"trial": t.number, "state": t.state.name, **t.params}
        values = t.values if t.state == TrialState.COMPLETE else [np.nan] * len(objectives)
        row.update(dict(zip(objectives, values)))
        row.update({col: t.user_attrs.get(col, np.nan) for col in BOUND_COLUMNS if col.split("/")[1] not in objectives})
        row["fail_reason"] = t.user_attrs.get(FAIL_REASON, "")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["pareto_rank"] = pareto_ranks(table[objectives].to_numpy(dtype=float))
    return table.sort_values(["pareto_rank", objectives[0], "trial"], na_position="last").reset_index(drop=True)


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


def format_table(table: pd.DataFrame) -> str:
    shown = table.drop(columns=[c for c in ("fail_reason",) if c in table and not table[c].any()])
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")
