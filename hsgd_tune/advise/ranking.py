"""The trials of a study as a pandas table, with Pareto ranks over the study's objectives, one
recommended trial by a documented rule, and the ranking written back to the MLflow runs."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from hsgd_tune.errors import ConfigError, HsgdError
from hsgd_tune.search.storage import storage_description
from hsgd_tune.search.study import lookup_study
from hsgd_tune.search.trials import (
    CERTIFICATE,
    ESTIMATE_TEXT,
    METRIC_ATTRS,
    finished_trial,
    ranked_table,
    rule_order,
)
from hsgd_tune.studyfile.config import RankConfig, StudyConfig, check_standard_errors, load_study
from hsgd_tune.studyfile.export import config_from_dict
from hsgd_tune.track.tracker import Tracker


def study_certificates(study: optuna.Study, tracker: Tracker, experiment: str) -> dict[int, float]:
    """Trial number → ``certificate/bound`` for the trials whose MLflow run has one (computed in
    the trial, or after the study: then only MLflow has it, not the Optuna trial)."""
    found = trial_certificates(study, tracker, experiment)
    return {n: c[CERTIFICATE] for n, c in found.items() if CERTIFICATE in c}


def trial_certificates(study: optuna.Study, tracker: Tracker, experiment: str) -> dict[int, dict[str, float]]:
    """Trial number → its MLflow run's ``certificate/…`` metrics (for the trials that have any)."""
    experiment_id = tracker.experiment_id(experiment, create=False)
    if experiment_id is None:
        return {}
    runs = tracker.trial_runs(experiment_id, study.study_name)
    found = {
        n: {k: v for k, v in r.data.metrics.items() if k.startswith("certificate/")} for n, r in runs.items()
    }
    return {n: c for n, c in found.items() if c}


def with_certificates(table: pd.DataFrame, certificates: dict[int, float]) -> pd.DataFrame:
    """``table`` with a ``certificate`` column before ``pareto_rank`` (NaN for trials without one),
    unless no trial has one or the certificate is an objective (a column already)."""
    if not certificates or "certificate" in table or table.empty:
        return table
    table = table.copy()
    column = table["trial"].map(certificates).astype(float)
    table.insert(table.columns.get_loc("pareto_rank"), "certificate", column)
    return table


def format_table(table: pd.DataFrame) -> str:
    shown = table.drop(columns=[c for c in ("fail_reason",) if c in table and not table[c].any()])
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


# ---------------------------------------------------------------------------------------------
# The recommendation: one trial, by a documented rule ([rank] in the study file, or the CLI)
# ---------------------------------------------------------------------------------------------

#: Certificates a trial may carry (user attributes or MLflow metrics), shown with the recommendation.
CERTIFICATES = {
    "certificate/heldout_error": "held-out error bound of the S-model",
    "certificate/perturbed_bound": "perturbed-dynamics certificate",
    CERTIFICATE: "PAC-Bayes certificate of the stochastic predictor Q",
}


def recommend(within: np.ndarray, prefer: np.ndarray, tolerance: float, **se) -> int | None:
    """Position of the recommended trial (the first in :func:`rule_order`), or None when no trial
    has both values."""
    order, _ = rule_order(within, prefer, tolerance, **se)
    return int(order[0]) if len(order) else None


def rule_text(rule: RankConfig) -> str:
    if rule.tolerance == 0 and rule.standard_errors == 0:
        return f"the finished trial with the smallest {rule.within}"
    parts = [f"{rule.tolerance:.0%}"] if rule.tolerance or not rule.standard_errors else []
    if rule.standard_errors:
        parts.append(f"{rule.standard_errors:g} standard error{'s' if rule.standard_errors != 1 else ''}")
    return (
        f"among the finished trials whose {rule.within} is within {' + '.join(parts)} of the best, "
        f"the one with the smallest {rule.prefer}"
    )


def rule_name(rule: RankConfig) -> str:
    """A short name: ``crossfit_loss``, ``val_loss +5% → risk_bound``, ``crossfit_loss 1 SE → gap_bound``."""
    if rule.tolerance == 0 and rule.standard_errors == 0:
        return rule.within
    band = " + ".join(
        ([f"+{rule.tolerance:.0%}"] if rule.tolerance or not rule.standard_errors else [])
        + ([f"{rule.standard_errors:g} SE"] if rule.standard_errors else [])
    )
    return f"{rule.within} {band} → {rule.prefer}"


@dataclass
class Ranking:
    """A study's trials, ranked, with the recommended trial (None if no trial finished).

    ``order`` lists the finished trials' numbers in the rule's order (the recommendation first);
    ``band`` is the upper edge of the rule's band on ``rule.within``; ``certificates`` maps a trial
    number to the certificates read from MLflow (the Optuna trial holds only those computed inside
    it); None when MLflow was not read."""

    study: optuna.Study
    table: pd.DataFrame
    rule: RankConfig
    recommended: int | None
    order: list[int] = dataclasses.field(default_factory=list)
    band: float = math.nan
    certificates: dict[int, dict[str, float]] | None = None  # None: MLflow was not read

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
        row = self._row(self.recommended)
        params = _params(self.trial(self.recommended))
        shown = (self.rule.within, self.rule.prefer) if self._banded else (self.rule.within,)
        values = ", ".join(f"{m}={row[m]:.4g}" for m in dict.fromkeys(shown))
        return f"Recommended: trial {self.recommended} ({params}; {values}): {rule_text(self.rule)}"

    def explain(self) -> list[str]:
        """A few lines: the estimate the recommendation rests on (± SE), its certificates, and the
        runner-up with why it lost."""
        if self.recommended is None:
            return []
        within, prefer = self.rule.within, self.rule.prefer
        lines = [f"  rule: {rule_name(self.rule)}"]
        lines.append(f"  rests on: {self._value(self.recommended, within, why=True)}")
        if prefer != within and self._banded:
            lines.append(f"  tie-break: {prefer} = {self._row(self.recommended)[prefer]:.4g}")
        certificates = self.certificates_of(self.recommended)
        shown = ", ".join(f"{k} ≤ {v:.4g} ({CERTIFICATES[k]})" for k, v in certificates.items())
        if shown or self.certificates is not None:  # unknown without MLflow (--no-mlflow): no line
            lines.append(f"  certificates: {shown or 'none yet (hsgd-tune certify computes them)'}")
        if len(self.order) > 1:
            lines.append(f"  runner-up: {self._runner_up()}")
        return lines

    @property
    def _banded(self) -> bool:
        return bool(self.rule.tolerance or self.rule.standard_errors)

    def certified(self) -> list[int] | None:
        """The finished trials that have their PAC-Bayes certificate; None when MLflow was not read."""
        if self.certificates is None:
            return None
        return sorted(n for n in self.order if CERTIFICATE in self.certificates_of(n))

    def certificates_of(self, number: int) -> dict[str, float]:
        attrs = self.trial(number).user_attrs
        found = {k: float(attrs[k]) for k in CERTIFICATES if k in attrs}
        found |= {k: v for k, v in (self.certificates or {}).get(number, {}).items() if k in CERTIFICATES}
        return {k: found[k] for k in CERTIFICATES if k in found and math.isfinite(found[k])}

    def _row(self, number: int) -> pd.Series:
        return self.table[self.table["trial"] == number].iloc[0]

    def _se(self, number: int, metric: str) -> float:
        attr = METRIC_ATTRS.get(metric)
        value = self.trial(number).user_attrs.get(f"{attr}_se") if metric in ESTIMATE_TEXT else None
        return float(value) if value is not None else math.nan

    def _value(self, number: int, metric: str, why: bool = False) -> str:
        """``metric = value ± SE``, and with ``why`` what the estimate is."""
        value, se = self._row(number)[metric], self._se(number, metric)
        text = f"{metric} = {value:.4g}"
        if math.isfinite(se):
            text += f" ± {se:.2g}" + (f" (standard error; {ESTIMATE_TEXT[metric]})" if why else "")
        return text

    def _runner_up(self) -> str:
        best, second = self.order[0], self.order[1]
        within, prefer = self.rule.within, self.rule.prefer
        head = f"trial {second} ({_params(self.trial(second))}), {self._value(second, within)}"
        a, b = self._row(best), self._row(second)
        if self._banded and b[within] <= self.band:
            return (
                f"{head}: also in the band ({within} ≤ {self.band:.4g}) but a larger {prefer}: "
                f"{b[prefer]:.4g} vs {a[prefer]:.4g}"
            )
        if self._banded:
            return f"{head}: outside the band ({within} ≤ {self.band:.4g})"
        diff = b[within] - a[within]
        se = math.hypot(self._se(best, within), self._se(second, within))
        noise = f", {diff / se:.2g} standard errors of the difference (unpaired)" if se > 0 else ""
        return f"{head}: larger by {diff:.2g}{noise}"


def certified_note(table: pd.DataFrame, certified, study_ref: str) -> str | None:
    """One plain line: which finished trials have their PAC-Bayes certificate (``certificate/bound``)
    and, when trials of the Pareto front lack it, the command that certifies them (after a study only
    the recommended trial and the runner-up are, by default); None when no trial has one (the
    recommendation's ``certificates`` line then says how to compute them)."""
    certified = sorted({int(n) for n in certified})
    if not certified or table.empty:
        return None
    complete = table[table["state"] == TrialState.COMPLETE.name]
    front = sorted(int(n) for n in complete.loc[complete["pareto_rank"] == 1, "trial"])
    missing = [n for n in front if n not in certified]
    every = len(certified) == len(complete) and len(complete) > 2
    text = f"Certified (certificate/bound): {'every finished trial' if every else _numbers(certified)}"
    if missing:
        text += (
            f"; not certified: {_numbers(missing)} of the Pareto front "
            f"(`hsgd-tune certify {study_ref}` certifies the front, `--all` every finished trial)"
        )
    return text + "."


def _numbers(trials: list[int]) -> str:
    return ("trial " if len(trials) == 1 else "trials ") + ", ".join(map(str, trials))


def _params(trial: FrozenTrial) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def rank_study(study: optuna.Study, rule: RankConfig) -> Ranking:
    """``trials_table`` plus the rule's metrics and a ``recommended`` column.

    Raises HsgdError when the study has no finished trial: there is nothing to recommend.
    """
    table, order, band = ranked_table(study, rule)
    recommended = order[0] if order else None
    table["recommended"] = table["trial"] == recommended
    return Ranking(study, table, rule, recommended, order, band)


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
        rule = dataclasses.asdict(ranking.rule)
        doc = {
            "study": ranking.name,
            "rule": {"name": rule_name(ranking.rule), **rule, "text": rule_text(ranking.rule)},
            "recommended_trial": ranking.recommended,
            "runner_up": ranking.order[1] if len(ranking.order) > 1 else None,
            "certified_trials": ranking.certified(),  # null: MLflow not read
            "explanation": [line.strip() for line in ranking.explain()],
            "trials": json.loads(table.to_json(orient="records")),  # NaN → null
        }
        return json.dumps(doc, indent=2) + "\n"
    note = certified_note(table, ranking.certified() or [], ranking.name)
    if fmt == "markdown":
        bullets = "".join(f"- {line.strip()}\n" for line in [*ranking.explain(), *[note] * bool(note)])
        return f"**{ranking.summary()}**\n\n{bullets}\n{markdown_table(table)}\n"
    explanation = "".join(f"{line}\n" for line in [*ranking.explain(), *[note] * bool(note)])
    front = table[table["pareto_rank"] == 1]
    shown = table.assign(recommended=np.where(table["recommended"], "*", ""))
    return (
        f"Pareto front of {ranking.name} ({len(front)} of {len(table)} trials):\n"
        f"{format_table(shown[shown['pareto_rank'] == 1])}\n\n"
        f"All trials of {ranking.name}:\n{format_table(shown)}\n\n{ranking.summary()}\n{explanation}"
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
    created. ``overrides`` (``within``, ``tolerance``, ``prefer``, ``standard_errors``; None = keep) change
    the rule.
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
    # The study file's rule was checked when loaded, so a failure here comes from an override.
    check_standard_errors(rule, "--standard-errors" if overrides.get("standard_errors") else "--within")
    return rank_study(study, rule), cfg


def stored_config(study: optuna.Study) -> StudyConfig:
    """The config a study was created with (kept in its user attributes by ``create_or_resume``)."""
    raw = json.loads(study.user_attrs["config"])
    raw.pop("source_file", None)
    return config_from_dict(raw)


def write_to_mlflow(ranking: Ranking, tracker: Tracker) -> int:
    """Tag every trial's run with its Pareto rank and whether it is recommended, log
    ``rank/pareto_rank`` and ``rank/order`` (the trial's place in the rule's order, 1 = recommended:
    what the MLflow UI's ranked view sorts by), and tag the study's parent run with the
    recommendation and its rule. Returns the number of runs written; runs missing from this
    tracking store (another ``MLFLOW_TRACKING_URI``?) are skipped with a warning."""
    runs = {t.number: t.user_attrs.get("mlflow_run_id") for t in ranking.study.get_trials(deepcopy=False)}
    places = {number: place for place, number in enumerate(ranking.order, start=1)}
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
        metrics = {"rank/pareto_rank": row.pareto_rank} if ranked else {}
        if row.trial in places:
            metrics["rank/order"] = places[row.trial]
        tracker.log(run_id, metrics=metrics or None, tags=tags)
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
