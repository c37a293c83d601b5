"""Finishing trials' MLflow runs in a child process, while the next trial trains.

A trial's last MLflow writes — its artifacts, some 300 metrics and tags, the final status — take
30–50 ms of SQLAlchemy work: as long as a quick-start trial's training, and pure Python, so a thread
would only take turns with the training loop for the GIL. A child process runs them on another core
instead (benchmarks/overhead.py measures both ways).

The writer starts on first use (``spawn``: the child imports MLflow afresh and never touches torch or
the parent's database connections) and is closed by :meth:`BackgroundWriter.close`, which waits until
every queued run is finished and raises :class:`StorageError` if any write failed. The child ignores
SIGINT and SIGTERM (the parent stops gracefully and then closes it), so a stopped study still
finishes the runs of the trials it completed; it exits by itself if its parent dies.
"""

from __future__ import annotations

import multiprocessing
import queue
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsgd_tune.errors import StorageError

#: How often an idle writer checks that its parent is still alive (so it never outlives it).
PARENT_CHECK_S = 1.0


@dataclass
class FinishJob:
    """Everything :meth:`hsgd_tune.tracking.Tracker.finish_trial` logs for one run."""

    run_id: str
    state: str
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    step: int = 0
    curves: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    artifacts: Path | None = None  # a folder to log and then delete


class BackgroundWriter:
    """A queue of :class:`FinishJob` served by one child process with its own MLflow client."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self._context = multiprocessing.get_context("spawn")
        self._jobs = None
        self._errors = None
        self._process = None
        self.pending: set[str] = set()  # run ids queued since the writer opened

    def submit(self, job: FinishJob) -> None:
        """Queue ``job``; raise StorageError if an earlier job failed."""
        self._raise_errors()
        if self._process is None:
            self._jobs, self._errors = self._context.Queue(), self._context.Queue()
            self._process = self._context.Process(
                target=serve, args=(self.tracking_uri, self._jobs, self._errors), daemon=True
            )
            self._process.start()
        self.pending.add(job.run_id)
        self._jobs.put(job)

    def close(self) -> None:
        """Wait until every queued run is finished; raise StorageError if a write failed."""
        if self._process is None:
            return
        self._jobs.put(None)
        self._process.join()
        code, self._process = self._process.exitcode, None
        self.pending.clear()
        self._raise_errors()
        if code != 0:
            raise StorageError(f"the MLflow writer process ended with exit code {code}")

    def _raise_errors(self) -> None:
        if self._errors is None:
            return
        try:
            message = self._errors.get_nowait()
        except queue.Empty:
            return
        raise StorageError(f"MLflow tracking store {self.tracking_uri}: {message}")


def serve(tracking_uri: str, jobs, errors) -> None:
    """The child: finish each queued run in order until ``None`` arrives or the parent is gone."""
    # A signal to the process group is the parent's to handle (worker.GracefulStop); it closes us.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    from hsgd_tune.tracking import Tracker

    tracker = Tracker(tracking_uri)
    while (job := _next_job(jobs)) is not None:
        try:
            tracker.finish_now(job)
        except Exception as exc:  # report, keep serving: later runs may still be written
            first_line = (str(exc).strip().splitlines() or [""])[0]
            errors.put(f"run {job.run_id}: {type(exc).__name__}: {first_line}")
        finally:
            if job.artifacts is not None:
                shutil.rmtree(job.artifacts, ignore_errors=True)


def _next_job(jobs) -> FinishJob | None:
    """The next job; None once asked to stop, or once the parent died and nothing is left."""
    while True:
        try:
            return jobs.get(timeout=PARENT_CHECK_S)
        except queue.Empty:
            if not multiprocessing.parent_process().is_alive():
                return None
