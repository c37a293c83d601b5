"""What ``hsgd-tune run`` prints last: the Pareto front, the recommendation, the next commands."""

from __future__ import annotations

import sys
from pathlib import Path

from optuna.trial import TrialState

from hsgd_tune.advise.ranking import (
    certified_note,
    rank_study,
    study_certificates,
    with_certificates,
    write_to_mlflow,
)
from hsgd_tune.errors import HsgdError
from hsgd_tune.search.runner import RunSummary
from hsgd_tune.search.storage import storage_description
from hsgd_tune.search.study import lookup_study
from hsgd_tune.studyfile.config import StudyConfig
from hsgd_tune.track.tracker import Tracker
from hsgd_tune.track.views import study_views, ui_base


def end_of_run(cfg: StudyConfig, summary: RunSummary, study_file: str, tracker: Tracker | None = None) -> str:
    """What ``run`` prints last: the count, the Pareto front (recommended trial starred, columns that
    are the same for every trial left out), the recommendation, and the next commands, last."""
    study = lookup_study(cfg.run.storage, cfg.name)
    if study is None:
        raise HsgdError(f"no study named {cfg.name!r} in {storage_description(cfg.run.storage)}")
    trials = study.get_trials(deepcopy=False)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    lines = [
        f"{summary.study}: {summary.trials_done}/{summary.budget} trials finished "
        f"({summary.trials_run} this run)" + (f", {failed} failed" if failed else "") + "."
    ]
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return "\n".join([*lines, "No finished trial to rank yet."])
    tracker = tracker or Tracker()
    ranking = rank_study(study, cfg.rank)
    write_to_mlflow(ranking, tracker)  # ranks and the recommendation, for the MLflow views below
    certificates = study_certificates(study, tracker, cfg.experiment_name)
    table = with_certificates(ranking.table, certificates)
    front = table[table["pareto_rank"] == 1]
    lines += [
        "",
        f"Pareto front ({len(front)} of {len(table)} trials; ★ recommended):",
        front_table(front, cfg),
    ]
    note = certified_note(table, certificates, study_file)  # which trials are certified, how to do the rest
    lines += ["", note] if note else []
    lines += ["", ranking.summary(), "", "Next:"]
    activate = _activate_hint()
    if activate:
        lines.append(f"  {activate:<44}  # in a new shell, so that hsgd-tune is on PATH")
    experiment = tracker.experiment_id(cfg.experiment_name, create=False)
    views = study_views(tracker, experiment, cfg.name, ui_base(tracker)) if experiment else {}
    commands = [
        (f"hsgd-tune rank {study_file}", "every trial, ranked"),
        (f"hsgd-tune report {study_file}", "interactive report (HTML)"),
        (
            f"hsgd-tune ui {study_file}",
            f"MLflow UI; trials ranked: {views['trials']}" if views else "MLflow UI",
        ),
    ]
    lines += [f"  {command:<44}  # {why}" for command, why in commands]
    return "\n".join(lines)


def front_table(front, cfg: StudyConfig) -> str:
    """The front as text: trial, sampled values, objectives, certificate; ★ on the recommended row."""
    shown = front.copy()
    shown.insert(0, " ", ["★" if r else "" for r in shown["recommended"]])
    keep = [" ", "trial", *[c for c in shown.columns if c in _sampled(cfg)], *cfg.objectives]
    keep += [c for c in ("certificate",) if c in shown]
    shown = shown[keep]
    # dropna=False: a certificate on some front trials only is not "the same for every trial"
    same = [c for c in shown.columns[2:] if shown[c].astype(str).nunique(dropna=False) <= 1]
    constant = same if len(shown) > 1 else []
    shown = shown.drop(columns=[c for c in constant if c not in cfg.objectives])
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")


def _sampled(cfg: StudyConfig) -> list[str]:
    return [knob.name for knob in cfg.search.all_knobs()]


def _activate_hint() -> str | None:
    """How to put ``hsgd-tune`` on PATH in a new shell, when this runs from a virtual env."""
    if sys.prefix == sys.base_prefix:
        return None
    venv = Path(sys.prefix)
    if Path(".venv").resolve() == venv.resolve():  # the quick-start's .venv (or a link to it)
        return ". .venv/bin/activate"
    try:
        shown = venv.relative_to(Path.cwd())
    except ValueError:
        shown = venv
    return f". {shown}/bin/activate"
