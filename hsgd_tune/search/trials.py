"""A study's trials as rows: the table with Pareto ranks, the rank rule's order over them (which trial
is recommended, which next), one finished trial, one line per trial."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from hsgd_tune.errors import ConfigError, HsgdError
from hsgd_tune.search.study import FAIL_REASON
from hsgd_tune.studyfile.config import RankConfig

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


# ---------------------------------------------------------------------------------------------
# The rank rule's order ([rank] in the study file): which trial is recommended, and which next
# ---------------------------------------------------------------------------------------------

#: Objective name → the trial user attribute that holds it for every completed trial, so the rule
#: may use a metric that is not one of the study's objectives.
METRIC_ATTRS = {
    "val_loss": "val/loss",
    "val_error": "val/error",
    "train_loss": "train/loss",
    "risk_bound": "bound/risk_bound",
    "gap_bound": "bound/gap_bound",
    "decoupling_distance": "bound/decoupling_distance",
    "heldout_loss": "heldout/loss",
    "crossfit_loss": "crossfit/loss",
}

#: What each estimate is, for the explanation; each has a standard error in ``<attr>_se``.
ESTIMATE_TEXT = {
    "val_loss": "the S-model's loss on V",
    "heldout_loss": "the S-model's loss on H",
    "crossfit_loss": "mean of the S-model's loss on H and the H-model's on S",
}


def rule_order(
    within: np.ndarray,
    prefer: np.ndarray,
    tolerance: float,
    within_se: np.ndarray | None = None,
    standard_errors: float = 0.0,
) -> tuple[np.ndarray, float]:
    """Positions of the trials in the rule's order, and the band's upper edge on ``within``.

    The band: ``best + tolerance·|best| + standard_errors·SE(best)``, best = the smallest ``within``
    (n,), SE(best) its ``within_se`` (n,). Trials in the band come first, by smallest ``prefer`` (n,),
    then ``within``, then position; the others follow by ``within``, then ``prefer``, then position.
    Trials with a NaN in ``within`` or ``prefer`` (unfinished) are left out.
    """
    within, prefer = np.asarray(within, dtype=float), np.asarray(prefer, dtype=float)
    finite = np.flatnonzero(np.isfinite(within) & np.isfinite(prefer))
    if not len(finite):
        return finite, math.nan
    best = finite[np.argmin(within[finite])]
    se = 0.0 if within_se is None or not standard_errors else float(within_se[best])
    band = within[best] + tolerance * abs(within[best]) + standard_errors * (se if math.isfinite(se) else 0.0)
    inside = finite[within[finite] <= band]
    outside = finite[within[finite] > band]
    # lexsort sorts by the last key first.
    first = inside[np.lexsort((inside, within[inside], prefer[inside]))]
    rest = outside[np.lexsort((outside, prefer[outside], within[outside]))]
    return np.concatenate([first, rest]), float(band)


def ranked_table(study: optuna.Study, rule: RankConfig) -> tuple[pd.DataFrame, list[int], float]:
    """:func:`trials_table` with the rule's metrics as columns, the finished trials' numbers in the
    rule's order (the first is the recommended one), and the band's upper edge (:func:`rule_order`).
    The advisor builds its ranking and explanation on this; ``run`` uses the order to choose the
    trials it certifies after the study.

    Raises HsgdError when the study has no finished trial: there is nothing to order.
    """
    table = trials_table(study)
    if table.empty or not (table["state"] == "COMPLETE").any():
        raise HsgdError(f"study {study.study_name!r} has no finished trials yet; run it first")
    attrs = {t.number: t.user_attrs for t in study.get_trials(deepcopy=False)}
    for key, name in (("within", rule.within), ("prefer", rule.prefer)):
        if name not in table and name not in METRIC_ATTRS:  # e.g. certificate, when not an objective
            known = sorted({*study.user_attrs.get("objectives", []), *METRIC_ATTRS})
            raise ConfigError(f"--{key} (or rank.{key})", f"must be one of {', '.join(known)}", name)
    for name in (rule.within, rule.prefer):
        if name not in table:
            table[name] = [attrs[n].get(METRIC_ATTRS[name], np.nan) for n in table["trial"]]
    complete = (table["state"] == "COMPLETE").to_numpy()
    within = np.where(complete, table[rule.within].to_numpy(dtype=float), np.nan)
    se = None
    if rule.within in ESTIMATE_TEXT:
        key = f"{METRIC_ATTRS[rule.within]}_se"
        se = np.array([attrs[n].get(key, np.nan) for n in table["trial"]], dtype=float)
    positions, band = rule_order(
        within, table[rule.prefer].to_numpy(dtype=float), rule.tolerance, se, rule.standard_errors
    )
    order = [int(table["trial"].iloc[i]) for i in positions]
    return table, order, band
