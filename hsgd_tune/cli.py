"""``hsgd-tune``: argument parsing and one-line errors; the work happens elsewhere."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from hsgd_tune import cli_advisor, cli_worker
from hsgd_tune.errors import ConfigError, HsgdError

DESCRIPTION = """\
Tune batch size and learning rate of SGD-trained PyTorch models with Optuna, scoring every trial by
validation loss and by a computable generalization bound over the whole SGD trajectory (the
geometric-decoupling bound of Dupuis & Viallard, arXiv 2312.00427). Everything is logged to MLflow
(default: sqlite:///mlruns/mlflow.db; MLFLOW_TRACKING_URI wins when set)."""

RUN_HELP = """\
Run a study until it has the study file's number of finished trials ([run] n_trials). Rerunning the
same command resumes the study: finished trials are kept, and a trial whose process died is re-run.
The study file, data and model are checked before anything is created. When the trials are done,
the Pareto-front trials get their PAC-Bayes certificate ([diagnostics] trials = "front", the
default; "all" computes it inside every trial, at several times the cost of training)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsgd-tune", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run or resume a tuning study", description=RUN_HELP)
    run.add_argument("study", type=Path, metavar="STUDY.toml", help="the study file (see studies/)")
    run.add_argument(
        "--n-trials",
        type=int,
        metavar="N",
        help="study-wide budget of finished trials (overrides [run] n_trials)",
    )
    run.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="stop starting new trials after this long"
    )
    run.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage: a database URL (postgresql://…) or a journal file path "
        "(default: mlruns/optuna-journal.log)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress display")
    cli_worker.add_run_options(run)  # --workers K

    cli_advisor.add_commands(sub)  # rank, report, certify, pick, train, ui
    cli_worker.add_commands(sub)  # worker
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except HsgdError as exc:
        message = " ".join(str(exc).splitlines())  # one line, even when a user's code wrote several
        print(f"hsgd-tune: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        print("hsgd-tune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from hsgd_tune.config import load_study, with_run

    if args.n_trials is not None and args.n_trials < 1:
        raise ConfigError("--n-trials", "must be a positive integer", args.n_trials)
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError("--timeout", "must be a positive number of seconds", args.timeout)
    cfg = with_run(load_study(args.study), n_trials=args.n_trials, timeout=args.timeout, storage=args.storage)
    from hsgd_tune.runner import (
        end_of_run,
        run_study,
    )  # torch, Optuna, MLflow: seconds; a bad file fails first

    if args.workers != 1:  # K local worker processes; each prints a line per trial
        summary = cli_worker.run_local_workers(args, cfg)
    else:
        summary = run_study(cfg, progress=not args.quiet)
    print(end_of_run(cfg, summary, str(args.study)))
    return 0


def _quiet_libraries() -> None:
    """Our own progress display and errors replace the libraries' chatter."""
    # MLflow (re)configures its loggers from this variable when it is imported, which happens later.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in ("alembic", "mlflow", "optuna"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
    except ImportError:
        pass
    warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"hsgd-tune: warning: {message}", file=sys.stderr)


COMMANDS = {"run": cmd_run, **cli_advisor.COMMANDS, **cli_worker.COMMANDS}

if __name__ == "__main__":
    sys.exit(main())
