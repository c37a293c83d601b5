"""``hsgd-tune worker`` and ``hsgd-tune run --workers K``: several processes share one study.

Argument parsing and process handling only; what a worker does is in search/worker.py. Heavy imports
(torch, Optuna, MLflow) wait until the study file has been read, so a bad one fails in a blink.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from hsgd_tune.errors import ConfigError, HsgdError

WORKER_HELP = """\
Join a study as one of any number of workers, on this machine or others. All workers share the
study-wide budget ([run] n_trials): each takes trials until the study as a whole has that many
finished ones, then exits. Across machines, share a PostgreSQL database (--storage
postgresql://user@host/db) and an MLflow tracking server (MLFLOW_TRACKING_URI=http://host:port).
A worker killed outright leaves its trial to be failed and re-run by the others (heartbeats);
SIGINT or SIGTERM lets the running trial finish, a second one stops at once (the trial is failed
and re-run). Start a worker again and it continues the study."""


def add_commands(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="join a study as one of several workers", description=WORKER_HELP)
    worker.add_argument("study", type=Path, metavar="STUDY.toml", help="the study file (see studies/)")
    worker.add_argument(
        "--storage",
        metavar="URL",
        help="shared Optuna storage: postgresql://user@host/db (several machines) or a journal file "
        "path (one machine); default: [run] storage, else mlruns/optuna-journal.log",
    )
    worker.add_argument("--n-trials", type=int, metavar="N", help="study-wide budget of finished trials")
    worker.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="stop starting new trials after this long"
    )
    worker.add_argument(
        "--heartbeat",
        type=int,
        metavar="SECONDS",
        help="PostgreSQL only: seconds between a running trial's heartbeats (default 10); a trial "
        "that misses three is failed and re-run by another worker",
    )
    add_threads_option(worker)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads per worker process (default: [run] threads, else the cores this process "
        "may use, divided among --workers, at most those idle)",
    )


def add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="K",
        help="run K worker processes on this machine, sharing the study (journal file or PostgreSQL); "
        "torch threads are split between them",
    )
    add_threads_option(run)


def _positive(name: str, value, integer: bool = True) -> None:
    if value is not None and not value > 0:
        raise ConfigError(name, f"must be a positive {'integer' if integer else 'number of seconds'}", value)


def run_config(args: argparse.Namespace):
    """The study file with the command line's ``[run]`` overrides, each checked (run and worker)."""
    from hsgd_tune.studyfile.config import load_study, with_run

    _positive("--n-trials", args.n_trials)
    _positive("--timeout", args.timeout, integer=False)
    _positive("--threads", args.threads)
    return with_run(
        load_study(args.study),
        n_trials=args.n_trials,
        timeout=args.timeout,
        storage=args.storage,
        threads=args.threads,
    )


def load_config(args: argparse.Namespace):
    from hsgd_tune.search.storage import check_shareable

    cfg = run_config(args)
    check_shareable(cfg.run.storage)
    return cfg


def cmd_worker(args: argparse.Namespace) -> int:
    _positive("--heartbeat", args.heartbeat)
    cfg = load_config(args)
    from hsgd_tune.search.runner import run_study
    from hsgd_tune.search.worker import GracefulStop, WorkerOptions, set_threads

    set_threads(cfg.run.threads)
    stop = GracefulStop(threading.Event()).install()
    options = WorkerOptions(stop=stop.event, lines=True, shared=True)
    if args.heartbeat is not None:
        options.heartbeat = args.heartbeat
    try:
        summary = run_study(cfg, progress=False, worker=options)
    finally:
        stop.uninstall()
    print(
        f"{summary.study}: {summary.trials_done}/{summary.budget} trials finished "
        f"({summary.trials_run} by this worker, pid {os.getpid()})",
        flush=True,
    )
    if stop.signum is not None and summary.trials_done < summary.budget:
        return 128 + stop.signum  # stopped on request before the budget was met
    return 0


def run_local_workers(args: argparse.Namespace, cfg):
    """``run --workers K``: check once here (one error line, not K), then start K ``worker``
    processes and wait for them. Signals are passed on, once: the workers run in their own
    process groups, so a Ctrl-C in the terminal does not reach them twice."""
    _positive("--workers", args.workers)
    from hsgd_tune.search.prepare import prepare
    from hsgd_tune.search.runner import RunSummary
    from hsgd_tune.search.storage import StudyLock, check_shareable, open_storage
    from hsgd_tune.search.study import create_or_resume, trials_done
    from hsgd_tune.search.worker import PARENT_ATTR, check_tracking, default_threads
    from hsgd_tune.track.tracker import check_tracking_uri, tracking_uri

    check_shareable(cfg.run.storage)
    prepare(cfg)
    check_tracking_uri(tracking_uri())  # both stores checked before either is opened
    check_tracking(tracking_uri())
    storage = open_storage(cfg.run.storage)
    with StudyLock(storage, cfg.run.storage, cfg.name)():
        before = trials_done(create_or_resume(cfg, storage))  # a changed study file fails here, once
    threads = cfg.run.threads or default_threads(args.workers)
    codes, interrupted = _spawn_and_wait(_worker_command(args, threads), args.workers, threads)
    study = create_or_resume(cfg, storage)
    done = trials_done(study)
    parent_id = study.user_attrs.get(PARENT_ATTR, "")
    summary = RunSummary(cfg.name, done - before, done, cfg.run.n_trials, "", parent_id)
    if interrupted:
        raise KeyboardInterrupt
    failed = [c for c in codes if c != 0]
    if failed:
        raise HsgdError(
            f"{len(failed)} of {args.workers} workers failed (exit codes {failed}); "
            f"{summary.trials_done}/{summary.budget} trials finished; run the same command again to resume"
        )
    return summary


def _worker_command(args: argparse.Namespace, threads: int) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "hsgd_tune.cli.main",
        "worker",
        str(args.study),
        "--threads",
        str(threads),
    ]
    for option, value in (
        ("--n-trials", args.n_trials),
        ("--timeout", args.timeout),
        ("--storage", args.storage),
    ):
        if value is not None:
            command += [option, str(value)]
    return command


def _spawn_and_wait(command: list[str], k: int, threads: int) -> tuple[list[int], bool]:
    # OpenMP reads this at start-up; torch.set_num_threads (--threads) covers torch's own pool.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(command, env=env, start_new_session=True) for _ in range(k)]
    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return codes, bool(received)


COMMANDS = {"worker": cmd_worker}
