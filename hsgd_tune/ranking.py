"""The trials of a study as a pandas table, with Pareto ranks over the study's objectives, one
recommended trial by a documented rule, and the ranking written back to the MLflow runs."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from hsgd_tune.config import RankConfig, StudyConfig, load_study
from hsgd_tune.errors import ConfigError, HsgdError
from hsgd_tune.study import FAIL_REASON, lookup_study, storage_description
from hsgd_tune.studyfile import config_from_dict
from hsgd_tune.tracking import Tracker

CERTIFICATE = "certificate/bound"

#: Bound terms shown next to the objectives (from the trials' user attributes).
BOUND_COLUMNS = (
    "bound/decoupling_distance",
    "bound/lipschitz",
    "bound/complexity",
    "bound/gap_bound",
    "bound/risk_bound",
)


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
        row["fail_reason"] = t.user_attrs.get(FAIL_REASON, "")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["pareto_rank"] = pareto_ranks(table[objectives].to_numpy(dtype=float))
    return table.sort_values(["pareto_rank", objectives[0], "trial"], na_position="last").reset_index(
        drop=True
    )


def study_certificates(study: optuna.Study, tracker: Tracker, experiment: str) -> dict[int, float]:
    """Trial number → ``certificate/bound`` for the trials whose MLflow run has one (computed in
    the trial, or after the study: then only MLflow has it, not the Optuna trial)."""
    experiment_id = tracker.experiment_id(experiment, create=False)
    if experiment_id is None:
        return {}
    runs = tracker.trial_runs(experiment_id, study.study_name)
    return {n: r.data.metrics[CERTIFICATE] for n, r in runs.items() if CERTIFICATE in r.data.metrics}


def with_certificates(table: pd.DataFrame, certificates: dict[int, float]) -> pd.DataFrame:
    """``table`` with a ``certificate`` column before ``pareto_rank`` (NaN for trials without one),
    unless no trial has one or the certificate is an objective (a column already)."""
    if not certificates or "certificate" in table or table.empty:
        return table
    table = table.copy()
    column = table["trial"].map(certificates).astype(float)
    table.insert(table.columns.get_loc("pareto_rank"), "certificate", column)
    return table


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


# ---------------------------------------------------------------------------------------------
# The recommendation: one trial, by a documented rule ([rank] in the study file, or the CLI)
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
}


def recommend(within: np.ndarray, prefer: np.ndarray, tolerance: float) -> int | None:
    """Index of the recommended trial, or None when no trial has both values.

    Candidates: trials whose ``within`` (n,) is at most ``best + tolerance·|best|`` (best = the
    smallest); among them the smallest ``prefer`` (n,) wins, ties broken by ``within``, then by
    position. NaN in either array (an unfinished trial) excludes the trial.
    """
    within, prefer = np.asarray(within, dtype=float), np.asarray(prefer, dtype=float)
    finite = np.isfinite(within) & np.isfinite(prefer)
    if not finite.any():
        return None
    best = within[finite].min()
    candidates = np.flatnonzero(finite & (within <= best + tolerance * abs(best)))
    # lexsort sorts by the last key first: prefer, then within, then index.
    order = np.lexsort((candidates, within[candidates], prefer[candidates]))
    return int(candidates[order[0]])


def rule_text(rule: RankConfig) -> str:
    return (
        f"among the finished trials whose {rule.within} is within {rule.tolerance:.0%} of the best, "
        f"the one with the smallest {rule.prefer}"
    )


@dataclass
class Ranking:
    """A study's trials, ranked, with the recommended trial (None if no trial finished)."""

    study: optuna.Study
    table: pd.DataFrame
    rule: RankConfig
    recommended: int | None

    @property
    def name(self) -> str:
        return self.study.study_name

    def trial(self, number: int) -> FrozenTrial:
        """The trial with this number; one clear error if the study has none, or it did not finish."""
        return finished_trial(self.study, number)

    def summary(self) -> str:
        """One line: the recommended trial, its values and the rule that chose it."""
        if self.recommended is None:
            return f"{self.name}: no recommendation (no finished trial)"
        row = self.table[self.table["trial"] == self.recommended].iloc[0]
        params = ", ".join(f"{k}={_short(v)}" for k, v in self.trial(self.recommended).params.items())
        values = ", ".join(f"{m}={row[m]:.4g}" for m in dict.fromkeys((self.rule.within, self.rule.prefer)))
        return f"Recommended: trial {self.recommended} ({params}; {values}): {rule_text(self.rule)}"


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


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def rank_study(study: optuna.Study, rule: RankConfig) -> Ranking:
    """``trials_table`` plus the rule's metrics and a ``recommended`` column.

    Raises HsgdError when the study has no finished trial: there is nothing to recommend.
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
    index = recommend(within, table[rule.prefer].to_numpy(dtype=float), rule.tolerance)
    recommended = None if index is None else int(table["trial"].iloc[index])
    table["recommended"] = table["trial"] == recommended
    return Ranking(study, table, rule, recommended)


# ---------------------------------------------------------------------------------------------
# Output formats
# ---------------------------------------------------------------------------------------------

FORMATS = ("table", "csv", "json", "markdown")


def render(ranking: Ranking, fmt: str) -> str:
    """The ranking as text in one of :data:`FORMATS` (``table`` is what the terminal shows)."""
    table = ranking.table
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        doc = {
            "study": ranking.name,
            "rule": {**dataclasses.asdict(ranking.rule), "text": rule_text(ranking.rule)},
            "recommended_trial": ranking.recommended,
            "trials": json.loads(table.to_json(orient="records")),  # NaN → null
        }
        return json.dumps(doc, indent=2) + "\n"
    if fmt == "markdown":
        return f"**{ranking.summary()}**\n\n{markdown_table(table)}\n"
    front = table[table["pareto_rank"] == 1]
    shown = table.assign(recommended=np.where(table["recommended"], "*", ""))
    return (
        f"Pareto front of {ranking.name} ({len(front)} of {len(table)} trials):\n"
        f"{format_table(shown[shown['pareto_rank'] == 1])}\n\n"
        f"All trials of {ranking.name}:\n{format_table(shown)}\n\n{ranking.summary()}\n"
    )


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' ``to_markdown`` needs the tabulate package)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "-" if np.isnan(value) else f"{value:.4g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Finding a study, and writing its ranking back to MLflow
# ---------------------------------------------------------------------------------------------

RANK_TAG, RECOMMENDED_TAG = "hsgd.pareto_rank", "hsgd.recommended"


def load_ranking(ref: str, storage: str | None = None, **overrides) -> tuple[Ranking, StudyConfig]:
    """The ranked study named by ``ref`` (a study file, or a study's name) and its config.

    The config is the study file's when ``ref`` is one, else the one the study stored when it was
    created. ``overrides`` (``within``, ``tolerance``, ``prefer``; None = keep) change the rule.
    """
    cfg = None
    path = Path(ref)
    if path.suffix == ".toml" or path.is_file():
        cfg = load_study(path, import_code=False)  # ranking runs no user code; certify/pick import it
        ref, storage = cfg.name, storage or cfg.run.storage
    study = lookup_study(storage, ref)
    if study is None:
        raise HsgdError(f"no study named {ref!r} in {storage_description(storage)}")
    if cfg is None:
        cfg = stored_config(study)
    rule = dataclasses.replace(cfg.rank, **{k: v for k, v in overrides.items() if v is not None})
    if rule.tolerance < 0:
        raise ConfigError(
            "--tolerance", "must be non-negative (a fraction of the best value)", rule.tolerance
        )
    return rank_study(study, rule), cfg


def stored_config(study: optuna.Study) -> StudyConfig:
    """The config a study was created with (kept in its user attributes by ``create_or_resume``)."""
    raw = json.loads(study.user_attrs["config"])
    raw.pop("source_file", None)
    return config_from_dict(raw)


def write_to_mlflow(ranking: Ranking, tracker: Tracker) -> int:
    """Tag every trial's run with its Pareto rank and whether it is recommended, log
    ``rank/pareto_rank`` (for sorting in the MLflow UI), and tag the study's parent run with the
    recommendation and its rule. Returns the number of runs written; runs missing from this
    tracking store (another ``MLFLOW_TRACKING_URI``?) are skipped with a warning."""
    runs = {t.number: t.user_attrs.get("mlflow_run_id") for t in ranking.study.get_trials(deepcopy=False)}
    written, missing, experiment_id = 0, [], None
    for row in ranking.table.itertuples(index=False):
        run_id = runs.get(row.trial)
        if run_id is None:
            continue
        try:
            experiment_id = tracker.client.get_run(run_id).info.experiment_id
        except MlflowException:
            missing.append(row.trial)
            continue
        ranked = row.pareto_rank > 0  # 0: the trial did not finish; no metric rather than a fake rank
        tags = {
            RANK_TAG: str(row.pareto_rank) if ranked else "unranked",
            RECOMMENDED_TAG: str(row.recommended).lower(),
        }
        tracker.log(run_id, metrics={"rank/pareto_rank": row.pareto_rank} if ranked else None, tags=tags)
        written += 1
    if missing:
        warnings.warn(
            f"runs of trials {missing} are not in the MLflow store {tracker.uri}; not tagged", stacklevel=2
        )
    parent = experiment_id and tracker.parent_run_id(experiment_id, ranking.name)
    if parent:
        tracker.log(
            parent,
            tags={
                "hsgd.recommended_trial": str(ranking.recommended),
                "hsgd.rank_rule": rule_text(ranking.rule),
            },
        )
    return written
