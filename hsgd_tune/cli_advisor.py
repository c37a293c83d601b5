"""The advisor's commands — ``rank``, ``report``, ``certify``, ``pick``, ``train``, ``ui`` — registered on the
``hsgd-tune`` parser by :mod:`hsgd_tune.cli`. Argument parsing and output only; the work happens in
:mod:`ranking`, :mod:`report`, :mod:`certify`, :mod:`pick` and :mod:`ui`, imported when a command
runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from hsgd_tune.config import OBJECTIVES
from hsgd_tune.errors import ConfigError, HsgdError

RANK_HELP = """\
Rank a study's trials and recommend one. Pareto ranks over the study's objectives (1 = the front, 2 =
the front once rank 1 is removed, ...; 0 = not finished). The recommended trial: among the finished
trials whose `within` metric (default val_loss) is within `tolerance` (default 5%%) of the best, the one
with the smallest `prefer` metric (default risk_bound); set in the study file's [rank] table or here.
The ranks and the recommendation are written to the MLflow runs (tags hsgd.pareto_rank,
hsgd.recommended, metric rank/pareto_rank), so the MLflow UI can sort and filter by them."""

REPORT_HELP = """\
Write the study's report: PNG plots (Pareto front, learning-rate × batch-size heatmaps, the bound's
decomposition, trajectories in 2-D, learning curves) and one HTML page with the ranking and the rank
correlation between the bound and the generalization gap; logged to the study's parent MLflow run."""

CERTIFY_HELP = """\
Compute the PAC-Bayes certificate (and the tail-index and analytic diagnostics) of finished trials
from what they recorded (trajectories.npz and model/ in their MLflow runs), log it to their runs and
print it. By default a study certifies its Pareto front when its trials are done ([diagnostics]
trials = "front"); this command certifies other trials too (default: the Pareto front). What is
certified: certificate/bound bounds the expected error (0-1, or the clipped loss over B) of the
stochastic predictor Q, weights drawn from N(μ, diag s²), not of the final weights; a PAC-Bayes-kl
bound with a prior built from the reference run only. Each trial spends δ_t/2 of its δ_t = δ /
max_trials on it, so all certificates of the study hold together with probability ≥ 1 − δ;
choosing which trials to certify after seeing their results is therefore fine. A trial whose run
already has a certificate is shown, not computed again."""

PICK_HELP = """\
Pick a trial (the recommended one by default): export it as a standalone study file with one value per
hyperparameter (train it again with `hsgd-tune train`), log its model with MLflow's PyTorch flavour,
register it in the Model Registry and point an alias (default: champion) at it. A trial without a
PAC-Bayes certificate is certified first (see `hsgd-tune certify`), so the chosen model has one."""

TRAIN_HELP = """\
Train one configuration from a study file whose search space has one value per hyperparameter (as
written by `hsgd-tune pick`), and print its losses and bound. Same seed, same result as the trial."""

UI_HELP = """\
Start the MLflow UI (and optuna-dashboard, if installed) on 127.0.0.1 for this study's stores, print
the URLs, and keep them running until Ctrl-C."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the advisor's subcommands to ``sub`` (their handlers are in :data:`COMMANDS`)."""
    rank = sub.add_parser("rank", help="rank the trials and recommend one", description=RANK_HELP)
    _study_args(rank)
    rank.add_argument(
        "--format",
        choices=("table", "csv", "json", "markdown"),
        help="output format (default: from --out's suffix, else table)",
    )
    rank.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="write the ranking to FILE (.csv, .json, .md) instead of the terminal",
    )
    rank.add_argument(
        "--no-mlflow", action="store_true", help="do not write ranks and recommendation to the MLflow runs"
    )

    report = sub.add_parser("report", help="plots and an HTML report of a study", description=REPORT_HELP)
    _study_args(report)
    report.add_argument(
        "--out", type=Path, metavar="DIR", help="report folder (default: mlruns/reports/<study>/)"
    )
    report.add_argument(
        "--no-mlflow", action="store_true", help="do not log the report to the study's parent run"
    )

    certify = sub.add_parser(
        "certify", help="certify finished trials (PAC-Bayes certificate)", description=CERTIFY_HELP
    )
    _study_args(certify, rule=False)
    which = certify.add_mutually_exclusive_group()
    which.add_argument(
        "--trials", metavar="N,M,...", help="trial numbers, separated by commas (default: the Pareto front)"
    )
    which.add_argument("--all", action="store_true", help="every finished trial")

    pick = sub.add_parser(
        "pick", help="export a trial's config and register its model", description=PICK_HELP
    )
    _study_args(pick)
    pick.add_argument("--trial", type=int, metavar="N", help="trial number (default: the recommended trial)")
    pick.add_argument(
        "--out", type=Path, metavar="FILE", help="exported study file (default: <study>-trial-NNNN.toml here)"
    )
    pick.add_argument("--model-name", metavar="NAME", help="registered model name (default: hsgd-<study>)")
    pick.add_argument(
        "--alias", default="champion", help="alias given to the new model version (default: champion)"
    )
    pick.add_argument("--force", action="store_true", help="overwrite an existing exported file")
    pick.add_argument(
        "--dry-run", action="store_true", help="say what would be exported and registered; change nothing"
    )

    train = sub.add_parser("train", help="train one exported configuration", description=TRAIN_HELP)
    train.add_argument(
        "config", type=Path, metavar="CONFIG.toml", help="a study file with one value per hyperparameter"
    )
    train.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="save the model, trajectories and metrics in DIR (must not exist)",
    )

    ui = sub.add_parser("ui", help="start the MLflow UI for a study", description=UI_HELP)
    _study_args(ui, rule=False)
    ui.add_argument("--port", type=int, default=5000, help="MLflow UI port (default: 5000)")
    ui.add_argument("--dashboard-port", type=int, default=8080, help="optuna-dashboard port (default: 8080)")


def _study_args(parser: argparse.ArgumentParser, rule: bool = True) -> None:
    parser.add_argument("study", metavar="STUDY", help="a study file, or a study's name")
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage of the study (default: the study file's, else mlruns/optuna-journal.log)",
    )
    if rule:
        parser.add_argument(
            "--tolerance",
            type=float,
            metavar="F",
            help="recommendation: how far, as a fraction of the best `within` value, a trial may be "
            "(default: [rank] tolerance, 0.05)",
        )
        parser.add_argument(
            "--within",
            choices=OBJECTIVES,
            help="recommendation: the metric the tolerance applies to (default: [rank] within, val_loss)",
        )
        parser.add_argument(
            "--prefer",
            choices=OBJECTIVES,
            help="recommendation: the metric minimised among those trials "
            "(default: [rank] prefer, risk_bound)",
        )


def _ranking(args: argparse.Namespace):
    from hsgd_tune.ranking import load_ranking

    return load_ranking(
        args.study, args.storage, tolerance=args.tolerance, within=args.within, prefer=args.prefer
    )


def cmd_rank(args: argparse.Namespace) -> int:
    from hsgd_tune.ranking import render, study_certificates, with_certificates, write_to_mlflow
    from hsgd_tune.tracking import Tracker

    fmt = args.format or _format_from_suffix(args.out)
    ranking, cfg = _ranking(args)
    tracker = None if args.no_mlflow else Tracker()
    if tracker is not None:  # certificates computed after the study live in MLflow only
        certificates = study_certificates(ranking.study, tracker, cfg.experiment_name)
        ranking = dataclasses.replace(ranking, table=with_certificates(ranking.table, certificates))
    text = render(ranking, fmt)
    if args.out is not None:
        write_text_atomically(args.out, text)
    if tracker is not None:
        write_to_mlflow(ranking, tracker)
    if args.out is None:
        print(text, end="")
    else:
        print(f"{ranking.summary()}\nwrote {args.out}")
    return 0


def _format_from_suffix(out: Path | None) -> str:
    if out is None:
        return "table"
    formats = {".csv": "csv", ".json": "json", ".md": "markdown", ".txt": "table"}
    if out.suffix not in formats:
        raise ConfigError("--out", f"must end in one of {', '.join(formats)} (or give --format)", str(out))
    return formats[out.suffix]


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed into place)."""
    if not path.parent.is_dir():
        raise ConfigError("--out", "must be in an existing folder", str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def cmd_report(args: argparse.Namespace) -> int:
    from hsgd_tune.report import write_report
    from hsgd_tune.tracking import Tracker

    ranking, cfg = _ranking(args)
    out = args.out or Path("mlruns/reports") / ranking.name
    page = write_report(ranking, cfg, Tracker(), out, log_to_mlflow=not args.no_mlflow)
    print(f"{ranking.summary()}\nreport: {page}")
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from hsgd_tune.certify import (
        certifiable,
        certify,
        complete_trials,
        format_results,
        front_trials,
        has_work,
    )
    from hsgd_tune.ranking import load_ranking
    from hsgd_tune.tracking import Tracker

    numbers = _trial_numbers(args.trials) if args.trials is not None else None
    ranking, cfg = load_ranking(args.study, args.storage)
    study = ranking.study
    if not has_work(cfg):
        raise HsgdError(
            f"study {study.study_name!r} has [certificate] enabled = false and no diagnostic on: "
            "nothing to certify"
        )
    if numbers is None:
        numbers = complete_trials(study) if args.all else front_trials(study)
    for number in numbers:  # every mistake before the first line of output
        certifiable(study, number)
    which = "every finished trial" if args.all else "the Pareto front" if args.trials is None else "trials"
    print(f"{study.study_name}: certifying {which} ({', '.join(map(str, numbers))})", flush=True)
    lock = _study_lock(args, study, cfg)
    results = certify(
        study, cfg, Tracker(), numbers, on_trial=lambda r: print(r.line(), flush=True), lock=lock
    )
    max_trials = study.user_attrs["max_trials"]
    print(f"\n{format_results(results)}\n")
    print(
        f"Each certificate bounds the expected error of the stochastic predictor Q; together they hold "
        f"with probability ≥ 1 − {cfg.bound.delta:g} (δ split over max_trials = {max_trials})."
    )
    return 0


def _trial_numbers(text: str) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 0:
        raise ConfigError("--trials", "must be trial numbers separated by commas, e.g. 3,5", text)
    return numbers


def cmd_pick(args: argparse.Namespace) -> int:
    from hsgd_tune.pick import pick

    if args.trial is not None and args.trial < 0:
        raise ConfigError("--trial", "must be a trial number (0 or more)", args.trial)
    ranking, cfg = _ranking(args)
    lock = _study_lock(args, ranking.study, cfg)
    for line in pick(
        ranking, cfg, args.trial, args.out, args.model_name, args.alias, args.force, args.dry_run, lock
    ):
        print(line)
    return 0


def _study_lock(args: argparse.Namespace, study, cfg):
    """The lock ``run`` takes on this study: its storage URL as ``load_ranking`` resolved it."""
    from hsgd_tune.certify import study_lock

    return study_lock(study, args.storage or (cfg.run.storage if cfg.source_file else None))


def cmd_train(args: argparse.Namespace) -> int:
    from hsgd_tune.pick import train_config

    for line in train_config(args.config, args.out):
        print(line)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from hsgd_tune.ui import serve

    return serve(args.study, args.storage, args.port, args.dashboard_port)


COMMANDS = {
    "rank": cmd_rank,
    "report": cmd_report,
    "certify": cmd_certify,
    "pick": cmd_pick,
    "train": cmd_train,
    "ui": cmd_ui,
}
