"""Running a study: check everything first, then create or resume it, then optimise with progress,
then certify the recommended trial and the runner-up, or the Pareto front (search/certification.py),
unless every trial was certified already.

Order matters for "bad input loses nothing": the study file, the data and the model are all checked
before any Optuna study or MLflow run exists, so a mistake leaves no trace.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from hsgd_tune.errors import HsgdError
from hsgd_tune.progress import listening
from hsgd_tune.search.certification import certify_front
from hsgd_tune.search.objective import Objective, config_params
from hsgd_tune.search.prepare import prepare
from hsgd_tune.search.storage import StudyLock, open_storage, storage_description
from hsgd_tune.search.study import create_or_resume, find_study, trials_done
from hsgd_tune.search.trials import describe_trial
from hsgd_tune.search.worker import (
    WorkerOptions,
    check_tracking,
    close_parent,
    open_parent_once,
    run_trials,
    trial_line_printer,
)
from hsgd_tune.studyfile.config import StudyConfig
from hsgd_tune.track.tracker import Tracker, check_tracking_uri, tracking_uri


@dataclass(frozen=True)
class RunSummary:
    study: str
    trials_run: int
    trials_done: int
    budget: int
    experiment_id: str
    parent_run_id: str


def run_study(
    cfg: StudyConfig,
    tracker: Tracker | None = None,
    progress: bool = True,
    worker: WorkerOptions | None = None,
) -> RunSummary:
    """Run ``cfg`` until the study as a whole has ``cfg.run.n_trials`` finished trials, resuming it
    if it exists. Any number of such workers may share the study (worker.py)."""
    data = prepare(cfg)
    options = worker or WorkerOptions()
    # Both stores are checked before either is written to: a bad one leaves nothing behind.
    uri = tracker.uri if tracker is not None else tracking_uri()
    check_tracking_uri(uri)
    check_tracking(uri)  # a server that is down: before the journal file is created
    storage = open_storage(cfg.run.storage, heartbeat=options.heartbeat)
    lock = StudyLock(storage, cfg.run.storage, cfg.name)
    with lock():  # one study, one experiment, one parent run, whatever the number of workers
        tracker = tracker or Tracker()  # creating a local MLflow database must not race either
        entropy = secrets.randbits(63) if options.shared else None  # see WorkerOptions.shared
        is_new = find_study(storage, cfg.name) is None
        study = create_or_resume(cfg, storage, entropy)
        try:
            experiment_id = tracker.experiment_id(cfg.experiment_name)
            parent_id = open_parent_once(
                study,
                tracker,
                experiment_id,
                params=config_params(cfg),
                tags={
                    "hsgd.fingerprint": cfg.fingerprint(),
                    "hsgd.storage": storage_description(cfg.run.storage),
                    "hsgd.objectives": ",".join(cfg.objectives),
                    "hsgd.grid_size": str(study.user_attrs["grid_size"]),
                    "hsgd.data": data.description,
                },
            )
        except BaseException:
            if is_new:  # made a moment ago, under the lock, by us: a failing MLflow store leaves no study
                optuna.delete_study(study_name=cfg.name, storage=storage)
            raise
    done_before = trials_done(study)
    remaining = max(cfg.run.n_trials - done_before, 0)
    objective = Objective(cfg, data, tracker, experiment_id, parent_id)
    display = Progress(cfg, remaining, done_before, enabled=progress and not options.lines)
    on_trial = trial_line_printer(cfg, study) if options.lines else display.on_trial
    interrupted, ran = False, 0
    try:
        budget, timeout = cfg.run.n_trials, cfg.run.timeout
        with display.trials():
            ran = run_trials(
                study, objective, budget, lock, tracker, experiment_id, options, timeout, on_trial
            )
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        display.close()
        stopped = interrupted or options.stop.is_set()
        close_parent(study, tracker, parent_id, study_metrics(study), cfg.run.n_trials, stopped)
    if not options.stop.is_set():  # a worker asked to stop leaves it to the next run
        # [diagnostics] trials = "recommended" or "front": the trials skipped the certificate; now it is done.
        shown = options.lines or not progress  # worker lines, or nothing: no bar
        say, on_pending = (_say(progress, options), None) if shown else (display.say, display.certifying)
        try:
            certify_front(study, cfg, tracker, data, lock, say=say, stop=options.stop, on_pending=on_pending)
        except HsgdError as exc:  # e.g. the trials' MLflow runs are gone: the trials themselves stand
            warnings.warn(f"certificates after the study not computed: {exc}", stacklevel=1)
        finally:
            display.close()
    return RunSummary(cfg.name, ran, trials_done(study), cfg.run.n_trials, experiment_id, parent_id)


def _say(progress: bool, options: WorkerOptions) -> Callable[[str], None] | None:
    """Print as the trials' lines were printed: prefixed by the worker, plain, or not at all."""
    if options.lines:
        who = f"{socket.gethostname()}:{os.getpid()}"
        return lambda line: print(f"[{who}] {line}", flush=True)
    return (lambda line: print(line, flush=True)) if progress else None


def study_metrics(study: optuna.Study) -> dict[str, float]:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    metrics = {
        "study/n_complete": len(complete),
        "study/n_failed": sum(t.state == TrialState.FAIL for t in trials),
    }
    objectives = study.user_attrs.get("objectives", [])
    for i, name in enumerate(objectives):
        if complete:
            metrics[f"study/best_{name}"] = min(t.values[i] for t in complete)
    return metrics


class Progress:
    """What a study run shows while it runs: one line per finished trial, above a bar of trials done
    (best so far, time left) and, under it, a bar of the running trial's SGD steps; after the
    trials, a bar of the after-study certificates."""

    def __init__(self, cfg: StudyConfig, remaining: int, done_before: int, enabled: bool = True):
        self.cfg, self.enabled, self.count, self.failed = cfg, enabled, 0, 0
        self.best: dict[str, float] = {}
        self.bar = self.steps = self.certificates = None
        if enabled and remaining > 0:
            from tqdm import tqdm

            before = f" ({done_before} done before)" if done_before else ""
            self.bar = tqdm(total=remaining, desc=f"{cfg.name}{before}", unit="trial", dynamic_ncols=True)
            self.started = time.monotonic()

    @contextlib.contextmanager
    def trials(self) -> Iterator[None]:
        """Show the running trial's steps (reported by train/twin.py) while the trials run."""
        if self.bar is None:
            yield
            return
        with listening(self._on_steps):
            yield

    def _on_steps(self, step: int, total: int) -> None:
        from tqdm import tqdm

        if self.steps is None or self.steps.total != total or step < self.steps.n:
            if self.steps is not None:
                self.steps.close()
            self.steps = tqdm(
                total=total, desc="  steps", unit="step", position=1, leave=False, dynamic_ncols=True
            )
        self.steps.update(step - self.steps.n)

    def on_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.count += 1
        if trial.state == TrialState.COMPLETE:
            for name, value in zip(self.cfg.objectives, trial.values, strict=True):
                self.best[name] = min(value, self.best.get(name, float("inf")))
        else:
            self.failed += 1
        if self.bar is not None:
            if self.steps is not None:
                self.steps.reset()
            self.bar.write(describe_trial(trial, self.cfg.objectives))
            postfix = {f"best {k}": f"{v:.4g}" for k, v in self.best.items()}
            if self.failed:
                postfix["failed"] = self.failed
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        for bar in (self.steps, self.bar, self.certificates):
            if bar is not None:
                bar.close()
        self.steps = self.bar = self.certificates = None

    # -- the after-study certificates -------------------------------------------------------

    def certifying(self, pending: list[int]) -> None:
        """certify_front's ``on_pending``: a bar over the trials it is about to certify."""
        if not self.enabled:
            return
        from tqdm import tqdm

        self.certificates = tqdm(total=len(pending), desc="certificates", unit="trial", dynamic_ncols=True)

    def say(self, line: str) -> None:
        """certify_front's ``say``: its lines above the bar; each line after the bar started is one
        certified trial (certify_front's order: the header, then a line per trial)."""
        if self.certificates is None:
            print(line, flush=True)
            return
        self.certificates.write(line)
        self.certificates.update(1)
        if self.certificates.n >= self.certificates.total:
            self.certificates.close()
            self.certificates = None


# ---------------------------------------------------------------------------------------------
# The end of a run
# ---------------------------------------------------------------------------------------------


__all__ = ["HsgdError", "RunSummary", "prepare", "run_study"]
