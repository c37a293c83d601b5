"""Workers: any number of processes, on one machine or many, share one study.

What makes that safe (issue #5):

- **A study-wide budget, exact.** A worker takes a trial slot only while holding the study lock and
  only when finished + running trials leave one free; otherwise it waits, because a running trial
  may still die and need a re-run. So the study ends with exactly ``n_trials`` finished trials, and
  a worker never starts a trial that would not count.
- **Dead workers.** On PostgreSQL every running trial sends Optuna heartbeats; a trial whose heartbeat
  stops is failed by the next worker that looks and queued once more with the same parameters
  (``RetryHeartbeatStaleTrialCallback``). On a journal file (no heartbeats) the same happens by pid, for
  workers on this host. Either way the dead trial's MLflow run is marked FAILED.
- **One parent run.** The MLflow experiment and the study's parent run are looked up or created under
  the same lock, and the parent's id is kept in the study's user attributes.

The study lock and the storages are storage.py's.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from hsgd_tune.errors import DivergedError, StorageError
from hsgd_tune.redact import redact
from hsgd_tune.search.storage import HEARTBEAT_S, StudyLock, retry_callback
from hsgd_tune.search.study import counts_towards_budget, fail_orphaned_trials, worker_identity
from hsgd_tune.search.trials import describe_trial
from hsgd_tune.track.tracker import (
    ROLE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    Tracker,
    credentials_to_environment,
    filter_value,
)

#: How often a worker with no free slot looks again (someone else's last trial may die).
POLL_S = 1.0
#: Where the study's MLflow parent run id is kept (Optuna study user attribute).
PARENT_ATTR = "mlflow_parent_run_id"

_log = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    """How one worker process runs (nothing here changes trial results)."""

    heartbeat: int = HEARTBEAT_S
    stop: threading.Event = field(default_factory=threading.Event)  # set: no new trial starts
    lines: bool = False  # one log line per trial (for workers whose output goes to a file)
    #: Other workers may run the study at the same time: seed this one's sampler apart from theirs
    #: (else workers that start together propose the same points). Sampling is then not repeatable.
    shared: bool = False


# -- storage ----------------------------------------------------------------------------------


# -- the study lock ---------------------------------------------------------------------------


# -- dead workers -----------------------------------------------------------------------------


def reap(study: optuna.Study, tracker: Tracker, experiment_id: str) -> None:
    """Fail the trials whose worker is gone, queue each once more, and fail their MLflow runs.

    Call under the study lock, so that two workers never fail and re-queue the same trial.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # PostgreSQL: heartbeats; re-queues via the callback
    retry = retry_callback()
    for trial in fail_orphaned_trials(study):  # journal: pid on this host
        retry(study, study._storage.get_trial(trial._trial_id))
    fail_dead_runs(study, tracker, experiment_id)


def fail_dead_runs(study: optuna.Study, tracker: Tracker, experiment_id: str) -> int:
    """Mirror the Optuna state onto every trial run still RUNNING whose trial is not."""
    runs = tracker.client.search_runs(
        [experiment_id],
        filter_string=(
            f"attributes.status = 'RUNNING' and tags.`{ROLE_TAG}` = 'trial' "
            f"and tags.`{STUDY_TAG}` = {filter_value(study.study_name)}"
        ),
        max_results=1000,
    )
    if not runs:
        return 0
    states = {t.number: t for t in study.get_trials(deepcopy=False)}
    fixed = 0
    for run in runs:
        trial = states.get(int(run.data.tags[TRIAL_TAG]))
        if trial is None or trial.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        reason = trial.user_attrs.get("fail_reason", "its worker died before the trial ended; re-run")
        tracker.finish_trial(run.info.run_id, trial.state.name, tags={"hsgd.fail_reason": reason})
        fixed += 1
    return fixed


# -- the budget -------------------------------------------------------------------------------


def free_slots(study: optuna.Study, budget: int) -> tuple[int, int]:
    """(finished trials that count, slots free for a new or queued trial)."""
    trials = study.get_trials(deepcopy=False)
    done = sum(counts_towards_budget(t) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return done, budget - done - running


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], tuple[float, ...]],
    budget: int,
    lock: StudyLock,
    tracker: Tracker,
    experiment_id: str,
    options: WorkerOptions,
    timeout: float | None = None,
    on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> int:
    """Run trials until the study has ``budget`` finished ones (or timeout, or stop); return how
    many this worker ran. A worker without a free slot waits rather than leaves: another worker's
    last trial may still die, and then this one re-runs it."""
    started, ran = time.monotonic(), 0
    while not options.stop.is_set():
        if timeout is not None and time.monotonic() - started > timeout:
            break
        with lock():
            reap(study, tracker, experiment_id)
            done, free = free_slots(study, budget)
            # ask() takes a queued (re-run) trial first; inside the lock, so slots are never oversold.
            trial = _ask(study) if done < budget and free > 0 else None
            if trial is not None:
                # Claim it before the lock opens: a re-run carries its dead worker's pid in the
                # user attrs it copied, and the journal reaper would fail it again.
                trial.set_user_attr("worker", worker_identity())
        if done >= budget:
            break
        if trial is None:
            options.stop.wait(POLL_S)
            continue
        frozen = run_one(study, trial, objective, tracker, options.heartbeat)
        ran += 1
        if on_trial is not None:
            on_trial(study, frozen)
    return ran


def _ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():
        # Optuna expects heartbeats only under Study.optimize; run_one sends them itself.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        return study.ask()


def run_one(study, trial: optuna.Trial, objective, tracker: Tracker, interval: int) -> FrozenTrial:
    """Run one asked trial with heartbeats and tell Optuna how it ended."""
    try:
        with heartbeat(study._storage, trial._trial_id, interval):
            values = objective(trial)
    except optuna.TrialPruned:
        return _tell(study, trial, tracker, state=TrialState.PRUNED)
    except DivergedError:  # counts: the objective recorded its fail_reason
        return _tell(study, trial, tracker, state=TrialState.FAIL)
    except BaseException as exc:  # interrupted or a bug: fail it and stop
        frozen = _tell(study, trial, tracker, state=TrialState.FAIL)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            requeue(study, frozen)  # stopped by the user, not by its parameters: run them again
        raise
    return _tell(study, trial, tracker, values=values)


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue ``trial``'s parameters once more (the next ``run`` or worker takes them first). An
    interrupt is not the trial's fault, so unlike a dead worker's trial there is no retry limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=None)(study, trial)


def _tell(study, trial, tracker: Tracker, values=None, state=None) -> FrozenTrial:
    """``study.tell``, except when another worker already failed this trial as stale (its heartbeat
    was late): then our MLflow run must not stay FINISHED next to a failed trial."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        frozen = study.tell(trial, values, state=state, skip_if_finished=True)
    intended = state or TrialState.COMPLETE
    run_id = frozen.user_attrs.get("mlflow_run_id")
    if frozen.state != intended and run_id is not None:
        reason = "its heartbeat was late, so another worker failed it and re-ran it"
        tracker.finish_trial(run_id, frozen.state.name, tags={"hsgd.fail_reason": reason})
    return frozen


@contextlib.contextmanager
def heartbeat(storage, trial_id: int, interval: int) -> Iterator[None]:
    """Record the trial's heartbeat every ``interval`` s while it runs (storages that have them)."""
    if not isinstance(storage, RDBStorage) or storage.get_heartbeat_interval() is None:
        yield
        return
    done = threading.Event()

    def beat() -> None:
        while not done.is_set():
            try:
                storage.record_heartbeat(trial_id)
            except Exception as exc:  # a database blip: try again; a long outage makes it stale
                _log.warning("heartbeat of trial id %s failed: %s", trial_id, exc)
            done.wait(interval)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# -- the parent run ---------------------------------------------------------------------------


def open_parent_once(study: optuna.Study, tracker: Tracker, experiment_id: str, params, tags) -> str:
    """The study's parent run, created by exactly one worker. Call under the study lock: the
    search-then-create in :meth:`Tracker.open_parent` is then race-free."""
    parent_id = tracker.open_parent(experiment_id, study.study_name, params=params, tags=tags)
    if study.user_attrs.get(PARENT_ATTR) != parent_id:
        study.set_user_attr(PARENT_ATTR, parent_id)
    return parent_id


def close_parent(
    study: optuna.Study, tracker: Tracker, parent_id: str, metrics, budget: int, interrupted: bool
):
    """Log the study's metrics; end the parent run unless other workers are still at it."""
    done, _ = free_slots(study, budget)
    still_running = any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
    if done >= budget:
        tracker.close_parent(parent_id, metrics, status="FINISHED")
    elif still_running:
        tracker.log(parent_id, metrics=metrics)  # another worker ends it
    else:
        tracker.close_parent(parent_id, metrics, status="KILLED" if interrupted else "FINISHED")


def check_tracking(uri: str) -> None:
    """A tracking server that is down fails here, in seconds and in one line (MLflow's client would
    retry for minutes, and only after the study had been created)."""
    if not uri.startswith(("http://", "https://")):
        return
    uri = credentials_to_environment(uri)  # a credentialed URL: basic auth, as MLflow will send it
    request = urllib.request.Request(uri.rstrip("/") + "/health")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user is not None and password is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except Exception as exc:
        reason = getattr(exc, "reason", exc)
        raise StorageError(
            f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not reachable: {redact(str(reason))}"
        ) from None


def trial_line_printer(cfg, study: optuna.Study) -> Callable[[optuna.Study, FrozenTrial], None]:
    """One line per finished trial, naming this worker: several workers' output stays readable."""
    who = f"{socket.gethostname()}:{os.getpid()}"

    def on_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        done, _ = free_slots(study, cfg.run.n_trials)
        line = describe_trial(trial, cfg.objectives)
        print(f"[{who}] {line}  ({done}/{cfg.run.n_trials} finished)", flush=True)

    return on_trial


# -- signals and threads ----------------------------------------------------------------------


class GracefulStop:
    """First SIGINT or SIGTERM: let the running trial finish, then exit. Second: stop now (the
    running trial is failed, its run marked FAILED, and another worker re-runs it)."""

    def __init__(self, event: threading.Event):
        self.event, self.signum = event, None
        self.previous: dict[int, Any] = {}

    def install(self) -> GracefulStop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before (the command is over)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"hsgd-tune: {name}: finishing the running trial, then stopping ({name} again to stop now)",
            file=sys.stderr,
            flush=True,
        )


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share), not
    the machine's count, which torch would otherwise use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        return os.cpu_count() or 1


def default_threads(workers: int = 1) -> int:
    """Torch threads per worker when none are asked for: the available cores shared among the
    ``workers`` processes of this machine, and no more than the cores left idle by what already runs
    (the 1-minute load average), at least one. Torch's threads spin while they wait for each other:
    on a busy machine two threads per process made trials many times slower than one."""
    cores = available_cores()
    try:
        idle = int(cores - os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average (Windows)
        idle = cores
    return max(1, min(cores // max(1, workers), idle))


def set_threads(threads: int | None, workers: int = 1) -> int:
    """Set this process's threads: ``threads``, or :func:`default_threads`, for torch's intra-op
    pool and for NumPy's BLAS (the bound's nearest-iterate products, whose two spinning OpenBLAS
    threads cost 0.3–1 s a trial on a busy 2-core machine); returns the number set (``run
    --threads``, ``worker --threads``, ``[run] threads``)."""
    import torch

    threads = threads or default_threads(workers)
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits  # scikit-learn's, which MLflow brings
    except ImportError:  # pragma: no cover
        return threads
    threadpool_limits(limits=threads, user_api="blas")
    return threads
