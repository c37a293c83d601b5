"""Running a study: check everything first, then create or resume it, then optimise with progress,
then certify the Pareto front (certify.py) unless every trial was certified already.

Order matters for "bad input loses nothing": the study file, the data and the model are all checked
before any Optuna study or MLflow run exists, so a mistake leaves no trace.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from hsgd_tune.certify import certify_front
from hsgd_tune.config import StudyConfig
from hsgd_tune.data import Dataset, load_dataset
from hsgd_tune.errors import ConfigError, HsgdError
from hsgd_tune.model_check import check_model
from hsgd_tune.objective import Objective, config_params
from hsgd_tune.study import (
    FAIL_REASON,
    create_or_resume,
    find_study,
    open_storage,
    storage_description,
    trials_done,
)
from hsgd_tune.tracking import Tracker, check_tracking_uri, tracking_uri
from hsgd_tune.worker import (
    StudyLock,
    WorkerOptions,
    check_tracking,
    close_parent,
    open_parent_once,
    run_trials,
    trial_line_printer,
)


@dataclass(frozen=True)
class RunSummary:
    study: str
    trials_run: int
    trials_done: int
    budget: int
    experiment_id: str
    parent_run_id: str


def prepare(cfg: StudyConfig) -> Dataset:
    """Load the data and build the model once; every failure names the study file."""
    try:
        try:
            data = load_dataset(cfg.data, cfg.seed)
        except MemoryError:
            raise ConfigError("data", "must fit in memory (lower the split sizes)", cfg.data.source) from None
        largest_batch = max(_knob_values(cfg.search.batch_size))
        if largest_batch > len(data.train.y):
            raise ConfigError(
                "search.batch_size",
                f"must not exceed the {len(data.train.y)} training examples",
                largest_batch,
            )
        n_parameters = check_model(cfg, data)  # built, one batch forward and backward, output size
        check_recording_memory(cfg, n_parameters)
    except ConfigError as exc:
        raise exc.in_file(cfg.source_file) if cfg.source_file else exc from None
    return data


def check_recording_memory(cfg: StudyConfig, n_parameters: int) -> None:
    """Both recorded trajectories must fit in this machine's memory (float32 iterates, or sketches)."""
    t = cfg.training
    width = n_parameters if n_parameters <= t.sketch_above else t.sketch_dim
    needed = 2 * (t.steps // t.record_every + 2) * width * 4
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no limit known
        return
    if needed > memory:
        raise ConfigError(
            "training.record_every",
            f"records {t.steps // t.record_every + 2} iterates of {width} numbers per run "
            f"({needed / 2**30:.3g} GiB), more than this machine's {memory / 2**30:.3g} GiB; "
            "record less often",
            t.record_every,
        )


def _knob_values(knob) -> list:
    return list(knob.choices) if knob.kind == "categorical" else [knob.low, knob.high]


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
        ran = run_trials(study, objective, budget, lock, tracker, experiment_id, options, timeout, on_trial)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        display.close()
        stopped = interrupted or options.stop.is_set()
        close_parent(study, tracker, parent_id, study_metrics(study), cfg.run.n_trials, stopped)
    if not options.stop.is_set():  # a worker asked to stop leaves it to the next run
        # [diagnostics] trials = "front": the trials skipped the certificate; the front gets it now.
        try:
            certify_front(study, cfg, tracker, data, lock, say=_say(progress, options), stop=options.stop)
        except HsgdError as exc:  # e.g. the trials' MLflow runs are gone: the trials themselves stand
            warnings.warn(f"certificates after the study not computed: {exc}", stacklevel=1)
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
    """Trials done, best so far and time left, on one line that redraws; one line per trial above."""

    def __init__(self, cfg: StudyConfig, remaining: int, done_before: int, enabled: bool = True):
        self.cfg, self.enabled, self.count, self.failed = cfg, enabled, 0, 0
        self.best: dict[str, float] = {}
        self.bar = None
        if enabled and remaining > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=remaining, desc=f"{cfg.name} ({done_before} done before)", unit="trial")
            self.started = time.monotonic()

    def on_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.count += 1
        if trial.state == TrialState.COMPLETE:
            for name, value in zip(self.cfg.objectives, trial.values, strict=True):
                self.best[name] = min(value, self.best.get(name, float("inf")))
        else:
            self.failed += 1
        if self.bar is not None:
            self.bar.write(describe_trial(trial, self.cfg.objectives))
            postfix = {f"best {k}": f"{v:.4g}" for k, v in self.best.items()}
            if self.failed:
                postfix["failed"] = self.failed
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def describe_trial(trial: FrozenTrial, objectives: tuple[str, ...]) -> str:
    params = "  ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    if trial.state == TrialState.COMPLETE:
        scores = "  ".join(f"{k}={v:.4g}" for k, v in zip(objectives, trial.values, strict=True))
    else:
        scores = f"{trial.state.name}: {trial.user_attrs.get(FAIL_REASON, 'no reason recorded')}"
    return f"trial {trial.number:4d}  {params}  {scores}"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


__all__ = ["HsgdError", "RunSummary", "prepare", "run_study"]
