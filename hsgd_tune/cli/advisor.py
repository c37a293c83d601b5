"""The advisor's commands — ``rank``, ``report``, ``certify``, ``pick``, ``train``, ``ui`` — registered on the
``hsgd-tune`` parser by :mod:`hsgd_tune.cli.main`. Argument parsing and output only; the work happens in
:mod:`ranking`, :mod:`report`, :mod:`certify`, :mod:`pick` and :mod:`ui`, imported when a command
runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from hsgd_tune.errors import ConfigError, HsgdError
from hsgd_tune.studyfile.config import OBJECTIVES, child_path

RANK_HELP = """\
Rank a study's trials and recommend one. Pareto ranks over the study's objectives (1 = the front, 2 =
the front once rank 1 is removed, ...; 0 = not finished). The recommended trial: among the finished
trials whose `within` metric is within `tolerance` (a fraction) plus `standard-errors` standard errors
of the best, the one with the smallest `prefer` metric; set in the study file's [rank] table or here.
The default is the trial with the smallest crossfit_loss (the mean of the S-model's loss on H and the
H-model's loss on S); rank explains its answer below the table (the estimate ± its standard error, the
certificates, the runner-up and why it lost).
The ranks and the recommendation are written to the MLflow runs (tags hsgd.pareto_rank,
hsgd.recommended, metrics rank/pareto_rank and rank/order), so the MLflow UI can sort and filter by them."""

REPORT_HELP = """\
Write the study's report: PNG plots (Pareto front, learning-rate × batch-size heatmaps, the bound's
decomposition, trajectories in 2-D, learning curves) and one HTML page with the ranking and the rank
correlation between the bound and the generalization gap; logged to the study's parent MLflow run."""

CERTIFY_HELP = """\
Compute the PAC-Bayes certificate (and the tail-index and analytic diagnostics) of finished trials
from what they recorded (trajectories.npz and model/ in their MLflow runs), log it to their runs and
print it. By default a study certifies its recommended trial and the runner-up when its trials are
done ([diagnostics] trials = "recommended"; "front": the whole Pareto front); this command certifies
other trials too (default: the Pareto front). What is
certified: certificate/bound bounds the expected error (0-1, or the clipped loss over B) of the
stochastic predictor Q, weights drawn from N(μ, diag s²), not of the final weights; a PAC-Bayes-kl
bound with a prior built from the reference run only; and the perturbed-dynamics certificate
certificate/perturbed_bound. Every configuration λ of the study's grid Λ has δ_λ = δ/|Λ| set aside
in advance, split among its statements, so all certificates of the study hold together with
probability ≥ 1 − δ, whatever the sampler did; choosing which trials to certify after seeing their
results is therefore fine. A trial whose run
already has a certificate is shown, not computed again."""

PICK_HELP = """\
Pick a trial (the recommended one by default): export it as a standalone study file with one value per
hyperparameter (train it again with `hsgd-tune train`), register a production model in the MLflow Model
Registry and point an alias (default: champion) at it. The model is a complete predictor (MLflow pyfunc,
logged from code; no pickle): raw feature rows in, class labels and probabilities (or regression outputs
in the target's units) out. By default it is the trial's own model, certified first if it has no
PAC-Bayes certificate (see `hsgd-tune certify`); its version carries the certificates and the statement
they make. With --refit the configuration is trained again on all the study's labelled rows (S, H and
V), and that model is registered instead: the trial's certificates do not cover it. Lineage (study,
trial, data fingerprint) is recorded in a run of its own; the trial's run is not touched."""

TRAIN_HELP = """\
Train one configuration from a study file whose search space has one value per hyperparameter (as
written by `hsgd-tune pick`), print its losses and bound, and log a run (params, metrics, the model as
a pyfunc predictor) in the study file's MLflow experiment (the original study's, for a file written by
`pick`). Same seed, same result as the trial."""

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
    report.add_argument(
        "--force",
        action="store_true",
        help="write into an existing folder that is not a report (its files are kept; same names replaced)",
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
    pick.add_argument(
        "--refit",
        action="store_true",
        help="register the configuration trained again on S ∪ H ∪ V (not covered by the certificates)",
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
    train.add_argument("--no-mlflow", action="store_true", help="do not log a run to MLflow")

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
            "(default: [rank] tolerance, 0)",
        )
        parser.add_argument(
            "--within",
            choices=OBJECTIVES,
            help="recommendation: the metric the band applies to (default: [rank] within, crossfit_loss)",
        )
        parser.add_argument(
            "--standard-errors",
            type=float,
            metavar="K",
            help="recommendation: widen the band by K standard errors of the best trial's `within` "
            "estimate (val_loss, heldout_loss, crossfit_loss; default: [rank] standard_errors, 0)",
        )
        parser.add_argument(
            "--prefer",
            choices=OBJECTIVES,
            help="recommendation: the metric minimised among those trials "
            "(default: [rank] prefer, risk_bound)",
        )


def _ranking(args: argparse.Namespace):
    from hsgd_tune.advise.ranking import load_ranking

    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise ConfigError(
            "--tolerance", "must be a finite non-negative fraction of the best value", args.tolerance
        )

    return load_ranking(
        args.study,
        args.storage,
        tolerance=args.tolerance,
        within=args.within,
        prefer=args.prefer,
        standard_errors=args.standard_errors,
    )


def cmd_rank(args: argparse.Namespace) -> int:
    from hsgd_tune.advise.ranking import render, trial_certificates, with_certificates, write_to_mlflow
    from hsgd_tune.search.trials import CERTIFICATE
    from hsgd_tune.track.tracker import Tracker

    fmt = args.format or _format_from_suffix(args.out)
    ranking, cfg = _ranking(args)
    tracker = None if args.no_mlflow else Tracker()
    if tracker is not None:  # certificates computed after the study live in MLflow only
        found = trial_certificates(ranking.study, tracker, cfg.experiment_name)
        certificates = {n: c[CERTIFICATE] for n, c in found.items() if CERTIFICATE in c}
        table = with_certificates(ranking.table, certificates)
        ranking = dataclasses.replace(ranking, table=table, certificates=found)
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
    if path.is_dir():
        raise ConfigError("--out", "must be a file, not a folder", str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError("--out", f"must be a file we can write ({exc.strerror})", str(path)) from None


def cmd_report(args: argparse.Namespace) -> int:
    from hsgd_tune.advise.report import write_report
    from hsgd_tune.track.tracker import Tracker

    ranking, cfg = _ranking(args)
    out = args.out or child_path(Path("mlruns/reports"), ranking.name)
    page = write_report(
        ranking, cfg, Tracker(must_exist=True), out, log_to_mlflow=not args.no_mlflow, force=args.force
    )
    print(f"{ranking.summary()}\nreport: {page}")
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from hsgd_tune.advise.ranking import load_ranking
    from hsgd_tune.search.certification import (
        certifiable,
        certify,
        complete_trials,
        format_results,
        front_trials,
        has_work,
    )
    from hsgd_tune.track.tracker import Tracker

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
        study,
        cfg,
        Tracker(must_exist=True),
        numbers,
        on_trial=lambda r: print(r.line(), flush=True),
        lock=lock,
    )
    print(f"\n{format_results(results)}\n")
    print(
        f"Each certificate bounds the expected error of the stochastic predictor Q; together they hold "
        f"with probability ≥ 1 − {cfg.bound.delta:g} (δ divided over the {cfg.grid_size} configurations "
        "of the search grid)."
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
    from hsgd_tune.advise.pick import pick

    if args.trial is not None and args.trial < 0:
        raise ConfigError("--trial", "must be a trial number (0 or more)", args.trial)
    if args.model_name is not None and (
        not args.model_name.strip() or any(c in args.model_name for c in "/:")
    ):
        raise ConfigError(
            "--model-name", "must be a non-empty name without '/' or ':' (MLflow's rule)", args.model_name
        )
    if args.out is not None and args.out.is_dir():
        raise ConfigError("--out", "must be a file, not a folder (even with --force)", str(args.out))
    ranking, cfg = _ranking(args)
    lock = _study_lock(args, ranking.study, cfg)
    for line in pick(
        ranking,
        cfg,
        args.trial,
        args.out,
        args.model_name,
        args.alias,
        args.force,
        args.dry_run,
        lock,
        refit=args.refit,
    ):
        print(line)
    return 0


def _study_lock(args: argparse.Namespace, study, cfg):
    """The lock ``run`` takes on this study: its storage URL as ``load_ranking`` resolved it."""
    from hsgd_tune.search.certification import study_lock

    return study_lock(study, args.storage or (cfg.run.storage if cfg.source_file else None))


def cmd_train(args: argparse.Namespace) -> int:
    from hsgd_tune.advise.pick import train_config

    for line in train_config(args.config, args.out, log=not args.no_mlflow):
        print(line)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from hsgd_tune.advise.ui import serve

    return serve(args.study, args.storage, args.port, args.dashboard_port)


COMMANDS = {
    "rank": cmd_rank,
    "report": cmd_report,
    "certify": cmd_certify,
    "pick": cmd_pick,
    "train": cmd_train,
    "ui": cmd_ui,
}
