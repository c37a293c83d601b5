"""``hsgd-tune``: argument parsing and one-line errors; the work happens elsewhere."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import NoReturn

from hsgd_tune.cli import advisor as cli_advisor
from hsgd_tune.cli import workers as cli_workers
from hsgd_tune.errors import ConfigError, HsgdError
from hsgd_tune.redact import redact

DESCRIPTION = """\
Tune batch size and learning rate of SGD-trained PyTorch models with Optuna, scoring every trial by
validation loss and by a computable generalization bound over the whole SGD trajectory (the
geometric-decoupling bound of Dupuis & Viallard, arXiv 2312.00427). Everything is logged to MLflow
(default: sqlite:///mlruns/mlflow.db; MLFLOW_TRACKING_URI wins when set)."""

RUN_HELP = """\
Run a study until it has the study file's number of finished trials ([run] n_trials). Rerunning the
same command resumes the study: finished trials are kept, and a trial whose process died is re-run.
The study file, data and model are checked before anything is created. When the trials are done,
the recommended trial and the runner-up get their PAC-Bayes certificate ([diagnostics] trials =
"recommended", the default; "front": the whole Pareto front; "all" computes it inside every trial, at
several times the cost of training); `hsgd-tune certify STUDY` certifies the rest of the front."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake shown like every other mistake: one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"hsgd-tune: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hsgd-tune", description=DESCRIPTION)
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
    cli_workers.add_run_options(run)  # --workers K

    cli_advisor.add_commands(sub)  # rank, report, certify, pick, train, ui
    cli_workers.add_commands(sub)  # worker
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except HsgdError as exc:
        # One line, even when a user's code wrote several; never a password, whoever wrote the text.
        message = redact(" ".join(str(exc).splitlines()))
        print(f"hsgd-tune: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        print("hsgd-tune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if not is_store_failure(exc):
            raise  # a bug: its traceback is what a report needs
        reason = redact(" ".join(str(exc).split())[:500]) or type(exc).__name__
        print(
            f"hsgd-tune: error: a store or file could not be used ({type(exc).__name__}: {reason})",
            file=sys.stderr,
        )
        return 1


def is_store_failure(exc: BaseException) -> bool:
    """A failure of the disk or of a store (full disk, read-only file, a database or MLflow error),
    not of this program: shown as one line, exit 1, like other storage problems."""
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__
    return module.startswith(("mlflow", "sqlalchemy", "optuna.storages", "optuna.exceptions", "psycopg"))


def cmd_run(args: argparse.Namespace) -> int:
    cfg = cli_workers.run_config(args)
    # torch, Optuna, MLflow: seconds to import; a bad study file fails first
    from hsgd_tune.advise.summary import end_of_run
    from hsgd_tune.search.runner import run_study

    stop = None
    if args.workers != 1:  # K local worker processes; each prints a line per trial
        summary = cli_workers.run_local_workers(args, cfg)
    else:
        from hsgd_tune.search.worker import GracefulStop, WorkerOptions, set_threads

        set_threads(cfg.run.threads)  # never more than this process's cores (torch may take more)
        # Ctrl-C (or SIGTERM) once: the running trial finishes, then the run stops; twice: now (the
        # trial is failed and its parameters queued again for the next run), as for `worker`.
        stop = GracefulStop(threading.Event()).install()
        try:
            summary = run_study(cfg, progress=not args.quiet, worker=WorkerOptions(stop=stop.event))
        finally:
            stop.uninstall()
    print(end_of_run(cfg, summary, str(args.study)))
    if stop is not None and stop.signum is not None and summary.trials_done < summary.budget:
        return 128 + stop.signum  # stopped on request before the budget was met; rerun to resume
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
    print(f"hsgd-tune: warning: {redact(' '.join(str(message).splitlines()))}", file=sys.stderr)


COMMANDS = {"run": cmd_run, **cli_advisor.COMMANDS, **cli_workers.COMMANDS}

if __name__ == "__main__":
    sys.exit(main())
