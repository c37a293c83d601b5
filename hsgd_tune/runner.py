"""Running a study: check everything first, then create or resume it, then optimise with progress,
then certify the recommended trial and the runner-up, or the Pareto front (certify.py), unless every
trial was certified already.

Order matters for "bad input loses nothing": the study file, the data and the model are all checked
before any Optuna study or MLflow run exists, so a mistake leaves no trace.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from hsgd_tune.certify import certify_front
from hsgd_tune.config import StudyConfig
from hsgd_tune.data import Dataset, load_dataset
from hsgd_tune.errors import ConfigError, HsgdError
from hsgd_tune.model_check import check_model
from hsgd_tune.objective import Objective, config_params
from hsgd_tune.progress import listening
from hsgd_tune.study import (
    FAIL_REASON,
    create_or_resume,
    find_study,
    lookup_study,
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
        """Show the running trial's steps (reported by training.py) while the trials run."""
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


def end_of_run(cfg: StudyConfig, summary: RunSummary, study_file: str, tracker: Tracker | None = None) -> str:
    """What ``run`` prints last: the count, the Pareto front (recommended trial starred, columns that
    are the same for every trial left out), the recommendation, and the next commands, last."""
    from hsgd_tune.mlflow_views import study_views, ui_base
    from hsgd_tune.ranking import (
        certified_note,
        rank_study,
        study_certificates,
        with_certificates,
        write_to_mlflow,
    )

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
