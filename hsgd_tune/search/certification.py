"""Certificates after the study: the PAC-Bayes certificate (and the diagnostics) of finished trials,
computed from what each trial recorded instead of inside the trial.

By default (``[diagnostics] trials = "recommended"``) trials skip the certificate, which costs more
than the training; when the study ends, the recommended trial and the runner-up are certified here
(``trials = "front"``: the whole Pareto front), and so is any trial that ``hsgd-tune pick`` chooses
or ``hsgd-tune certify`` names (by default: the Pareto front). The result is the same number the
trial would have logged: the trial's ``trajectories.npz`` holds both trajectories exactly as trained
(float32, as in memory), its ``model/`` the S-run's final model, and everything random in
:func:`hsgd_tune.certify.diagnostics.measure` is seeded by the study seed.

What is certified: ``certificate/bound`` is a PAC-Bayes-kl bound on the expected error of the
*stochastic* predictor Q (weights drawn from N(μ, diag s²) at prediction time), with a prior built from
the reference run only; ``certificate/perturbed_bound`` is the perturbed-dynamics certificate (the seed
paper's setting: Q_k = N(w^S_k, σ²I) against P_k = N(w^H_k, σ²I)). Every configuration λ of the study's
grid Λ has its share of δ_λ = δ·π(λ) set aside for each (grid.py), so all certificates of a study hold
jointly with probability ≥ 1 − δ (a union bound over Λ, whatever the sampler did). That is why choosing
which trials to certify *after* seeing their results is fine: each statement was paid for in advance,
whether or not it is ever computed.

Optuna does not let finished trials change, so MLflow is the record: a trial counts as certified when
its run has ``certificate/bound`` (or the diagnostics' timing, or the ``hsgd.diagnostics`` tag this
module writes), and it is never computed twice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import torch
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from hsgd_tune.bound import TrajectoryBound
from hsgd_tune.certify.diagnostics import measure
from hsgd_tune.data.datasets import Dataset
from hsgd_tune.errors import ConfigError, HsgdError
from hsgd_tune.search.objective import DELTA_SPLIT, train_settings, trial_bound
from hsgd_tune.search.prepare import prepare
from hsgd_tune.search.storage import StudyLock
from hsgd_tune.search.study import check_union_over_grid
from hsgd_tune.search.trials import CERTIFICATE, finished_trial, ranked_table, trials_table
from hsgd_tune.search.worker import available_cores
from hsgd_tune.studyfile import grid
from hsgd_tune.studyfile.config import StudyConfig
from hsgd_tune.track.tracker import Tracker
from hsgd_tune.train.models import ModelSpec, build_model, count_parameters
from hsgd_tune.train.twin import TwinRun

#: Tag on a trial's run saying when its certificate and diagnostics were computed (or why not).
DIAGNOSTICS_TAG = "hsgd.diagnostics"
AFTER_STUDY = "after the study"
#: Any of these on a run means measure() already ran for its trial (inside it, or after the study).
DONE_METRICS = (CERTIFICATE, "time/diagnostics_s")


@dataclass(frozen=True)
class Certified:
    """One trial's certificate: computed now, or found on its run."""

    trial: int
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)  # certificate/…, tail/…, time/…
    tags: dict[str, str] = field(default_factory=dict)
    computed: bool = False  # False: the run already had it

    @property
    def bound(self) -> float:
        return self.metrics.get(CERTIFICATE, math.nan)

    @property
    def trivial(self) -> float:
        return self.metrics.get("certificate/trivial", math.nan)

    @property
    def vacuous(self) -> str:
        return {"true": "yes", "false": "no"}.get(self.tags.get("hsgd.vacuous.certificate", ""), "-")

    @property
    def seconds(self) -> float:
        return self.metrics.get("time/diagnostics_s", math.nan)

    @property
    def when(self) -> str:
        """Computed "now", "after the study" (earlier), "in the trial", or "skipped: <why>"."""
        recorded = self.tags.get(DIAGNOSTICS_TAG, "in the trial")
        return "now" if self.computed and not recorded.startswith("skipped") else recorded

    def line(self) -> str:
        """What a user reads as each trial is done: ``certificate for trial 7: 0.254 (trivial 0.9)``."""
        if math.isfinite(self.bound):
            vacuous = "; vacuous" if self.vacuous == "yes" else ""
            value = f"{self.bound:.3g} (trivial {self.trivial:.3g}{vacuous})"
            return f"certificate for trial {self.trial}: {value}"
        reason = self.tags.get(DIAGNOSTICS_TAG, "")
        if reason.startswith("skipped"):
            return f"certificate for trial {self.trial}: {reason}"
        return f"diagnostics for trial {self.trial}: done (no certificate: [certificate] enabled = false)"


# ---------------------------------------------------------------------------------------------
# Which trials
# ---------------------------------------------------------------------------------------------


def front_trials(study: optuna.Study) -> list[int]:
    """Numbers of the finished trials with Pareto rank 1 over the study's objectives."""
    table = trials_table(study)
    if table.empty:
        return []
    front = table[(table["pareto_rank"] == 1) & (table["state"] == TrialState.COMPLETE.name)]
    return sorted(int(n) for n in front["trial"])


def complete_trials(study: optuna.Study) -> list[int]:
    return sorted(t.number for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE)


def has_work(cfg: StudyConfig) -> bool:
    """Whether measure() would compute anything at all for this study."""
    diag = cfg.diagnostics
    return cfg.certificate.enabled or diag.tail_index or diag.analytic or diag.fractal


def is_done(run) -> bool:
    """The run already holds its trial's certificate/diagnostics (from the trial, or from here)."""
    return any(k in run.data.metrics for k in DONE_METRICS) or DIAGNOSTICS_TAG in run.data.tags


# ---------------------------------------------------------------------------------------------
# Certifying
# ---------------------------------------------------------------------------------------------


def certify(
    study: optuna.Study,
    cfg: StudyConfig,
    tracker: Tracker,
    numbers: Iterable[int],
    data: Dataset | None = None,
    on_trial: Callable[[Certified], None] | None = None,
    lock: Callable[[], contextlib.AbstractContextManager] | None = None,
    stop: threading.Event | None = None,
    workers: int | None = None,
) -> list[Certified]:
    """Certify trials ``numbers`` of ``study`` unless their runs already hold a certificate.

    Every trial is checked (exists, finished, has an MLflow run) before any is computed. ``data``
    defaults to ``prepare(cfg)`` (prepare.py), loaded only if some trial needs it. ``lock`` (a
    :class:`~hsgd_tune.search.storage.StudyLock`) is held around each trial's check-compute-log, so several
    processes certifying the same study compute each trial once. ``on_trial`` sees each trial
    computed now (not those found done). Once ``stop`` is set, no further trial starts.
    ``workers``: threads computing certificates side by side (default: :func:`parallel_workers` for the
    study's model).
    """
    _check_same_study(cfg, study)
    trials = [certifiable(study, n) for n in dict.fromkeys(numbers)]
    workers = parallel_workers(len(trials), cfg.model.kind) if workers is None else workers
    with _one_blas_thread():
        if workers > 1:
            return _certify_in_parallel(cfg, tracker, trials, data, on_trial, lock, stop, workers)
        return _certify_in_turn(cfg, tracker, trials, data, on_trial, lock, stop)


@contextlib.contextmanager
def _one_blas_thread():
    """NumPy's BLAS on one thread while certifying (the trajectory bound's nearest-point products),
    as torch is: its default of one thread per core spins against whatever else runs, and made the
    bound several times slower on a shared machine. The numbers do not change (the products only
    shortlist nearest points, whose distances are then computed directly; tests/test_certify.py
    compares the certificates with those computed inside the trials)."""
    try:
        from threadpoolctl import threadpool_limits  # with scikit-learn, which mlflow brings
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _certify_in_turn(cfg, tracker, trials, data, on_trial, lock, stop) -> list[Certified]:
    """:func:`certify` one trial after the other in this thread, ``lock`` held around each."""
    results = []
    for trial in trials:
        if stop is not None and stop.is_set():
            break
        run_id = trial.user_attrs["mlflow_run_id"]
        with lock() if lock is not None else contextlib.nullcontext():
            run = _get_run(tracker, trial.number, run_id)
            if is_done(run):
                results.append(_found(trial.number, run))
                continue
            if data is None:
                data = prepare(cfg)
            result = certify_trial(cfg, data, tracker, trial, run.data.metrics)
        results.append(result)
        if on_trial is not None:
            on_trial(result)
    return results


#: Fewest trials to certify side by side: threads start at no cost, but one trial is one thread.
PARALLEL_FROM = 2


#: Built-in models whose certificates are bound by the interpreter, not by the cores: gradients written
#: out on small matrices (certify/backprop.py), thousands of short kernels. Two threads in one process
#: take turns holding the GIL: the quick-start's two certificates took 0.66–0.69 s side by side and
#: 0.65–0.67 s in turn (each certificate twice as long beside the other), where a CNN's two took 2.0 s
#: side by side and 3.6 s in turn. So these are certified in turn, at half the CPU time.
IN_TURN_MODELS = ("mlp", "linear")


def parallel_workers(n_trials: int, model_kind: str = "") -> int:
    """Threads to certify ``n_trials`` with: the cores that nothing else keeps busy, at most one per
    trial; 1 (this thread alone) on a busy machine, or for a model in :data:`IN_TURN_MODELS`. The
    1-minute load average counts this process's own trials too (up to one core: one torch thread
    each), which the certificates now take over. Idle cores are rounded, not truncated: the average
    lags, and right after a quick-start study on 2 cores it reads 1.2–1.5, which truncation turned
    into one thread and certificates in turn."""
    if model_kind in IN_TURN_MODELS:
        return 1
    cores = available_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        load = 0.0
    idle = round(cores - max(0.0, load - 1.0))
    workers = min(idle, n_trials)
    return workers if n_trials >= PARALLEL_FROM and workers > 1 else 1


def _certify_in_parallel(cfg, tracker, trials, data, on_trial, lock, stop, workers):
    """:func:`certify` with the pending trials computed by ``workers`` threads of this process, side
    by side (torch releases the GIL in its kernels; a thread starts at no cost, where a process pays
    seconds of imports). Each trial runs the same code on the same recorded arrays with one torch
    thread (set here for the whole batch, as every trial's random numbers come from its own seeded
    generators), so every number is bit for bit the one a sequential :func:`certify` logs. This
    thread logs the results, in trial order, and ``on_trial`` sees them in that order; ``lock`` is
    held over the whole batch (not per trial), so a concurrent certifier still computes no trial
    twice. Once ``stop`` is set no further trial starts; those already running finish and are logged."""
    from concurrent.futures import ThreadPoolExecutor

    results: dict[int, Certified] = {}
    with lock() if lock is not None else contextlib.nullcontext():
        pending = []
        for trial in trials:
            run = _get_run(tracker, trial.number, trial.user_attrs["mlflow_run_id"])
            if is_done(run):
                results[trial.number] = _found(trial.number, run)
            else:
                pending.append((trial, run.data.metrics))
        if pending and data is None:
            data = prepare(cfg)

        def compute(trial, run_metrics):
            if stop is not None and stop.is_set():
                return None
            return _compute(cfg, data, tracker, trial, run_metrics)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one for all: measure()'s own set-and-restore would race across threads
        pool = ThreadPoolExecutor(min(workers, max(1, len(pending))), thread_name_prefix="hsgd-certify")
        try:
            futures = [(t, pool.submit(compute, t, metrics)) for t, metrics in pending]
            for trial, future in futures:
                computed = future.result()
                if computed is None:
                    continue
                results[trial.number] = _log(tracker, *computed)
                if on_trial is not None:
                    on_trial(results[trial.number])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads)
    return [results[t.number] for t in trials if t.number in results]


def recorded(study: optuna.Study, tracker: Tracker, number: int) -> Certified | None:
    """Trial ``number``'s certificate as its run holds it, or None when it has none yet."""
    trial = certifiable(study, number)
    run = _get_run(tracker, number, trial.user_attrs["mlflow_run_id"])
    return _found(number, run) if is_done(run) else None


def _check_same_study(cfg: StudyConfig, study: optuna.Study) -> None:
    """A study file edited since the study was made would certify with other settings than the
    trials were trained with."""
    check_union_over_grid(study, cfg.source_file)
    stored = study.user_attrs.get("fingerprint")
    if stored is not None and stored != cfg.fingerprint():
        raise ConfigError(
            "name",
            f"names study {study.study_name!r}, made from another config (fingerprint {stored}); "
            "certify it by its name to use the config it was made with",
            cfg.name,
            file=cfg.source_file,
        )


def certifiable(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number``, or one clear error if it does not exist, did not finish or has no run."""
    trial = finished_trial(study, number)
    if "mlflow_run_id" not in trial.user_attrs:
        raise HsgdError(f"trial {number} of study {study.study_name!r} has no MLflow run to certify from")
    return trial


def _get_run(tracker: Tracker, number: int, run_id: str):
    try:
        return tracker.client.get_run(run_id)
    except MlflowException:
        raise HsgdError(
            f"the MLflow run {run_id} of trial {number} is not in the tracking store {tracker.uri} "
            "(is MLFLOW_TRACKING_URI the study's?)"
        ) from None


def _found(number: int, run) -> Certified:
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("certificate/", "time/diag"))}
    return Certified(number, run.info.run_id, metrics, dict(run.data.tags), computed=False)


def certify_trial(
    cfg: StudyConfig,
    data: Dataset,
    tracker: Tracker,
    trial: FrozenTrial,
    run_metrics: dict[str, float],
) -> Certified:
    """Rebuild trial ``trial`` from its artifacts, run :func:`measure` on it as the trial would have,
    and log the result to its (finished) MLflow run at the trial's last step."""
    return _log(tracker, *_compute(cfg, data, tracker, trial, run_metrics))


def _compute(cfg, data, tracker, trial, run_metrics) -> tuple[int, str, dict, dict, int]:
    """:func:`certify_trial` up to the logging: (trial, run id, metrics, tags, step)."""
    run_id = trial.user_attrs["mlflow_run_id"]
    settings = train_settings(cfg, trial.params)
    with tempfile.TemporaryDirectory(prefix="hsgd-certify-") as tmp:
        twin = load_twin(tracker, trial.number, run_id, Path(tmp), run_metrics)
    started = time.perf_counter()
    # The trial logged its trajectory bound; recomputing it (L_pop's passes over V) would repeat the
    # same numbers at ~0.2 s of a quick-start certificate's ~1.1 s (~0.4 s of a CNN's ~8 s).
    deltas = grid.statement_deltas(cfg)
    logged = TrajectoryBound.from_metrics(run_metrics, deltas["trajectory"], len(data.train.y))
    bound = logged if logged is not None else trial_bound(cfg, data, twin)
    measured = measure(cfg, data, settings, twin, bound, deltas)
    timings = {f"time/{k}_s": v for k, v in measured.seconds.items()}
    metrics = {**measured.metrics, **timings, "time/diagnostics_s": time.perf_counter() - started}
    tags = dict(measured.tags)
    tags.setdefault(DIAGNOSTICS_TAG, AFTER_STUDY)  # measure's own "skipped: …" says more; keep it
    if measured.metrics:  # as objective.TrialOutcome.tags() says for a trial that measured
        tags["hsgd.delta_split"] = DELTA_SPLIT
    return trial.number, run_id, metrics, tags, settings.steps


def _log(tracker: Tracker, number: int, run_id: str, metrics: dict, tags: dict, step: int) -> Certified:
    tracker.log(run_id, metrics=metrics, step=step, tags=tags)
    return Certified(number, run_id, metrics, tags, computed=True)


def load_twin(
    tracker: Tracker, number: int, run_id: str, folder: Path, run_metrics: dict[str, float]
) -> TwinRun:
    """The parts of a trial's TwinRun that measure() reads, from its run's artifacts and metrics."""
    if "train/loss_clipped" not in run_metrics:
        raise HsgdError(f"the MLflow run {run_id} of trial {number} has no train/loss_clipped metric")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per trial is noise
    try:
        arrays_path = tracker.client.download_artifacts(run_id, "trajectories.npz", str(folder))
        model_dir = tracker.client.download_artifacts(run_id, "model", str(folder))
    except (MlflowException, OSError) as exc:
        raise HsgdError(
            f"trial {number} cannot be certified: its MLflow run {run_id} has no trajectories.npz and "
            f"model/ artifacts ({type(exc).__name__})"
        ) from None
    with np.load(arrays_path) as arrays:
        model = read_model(Path(model_dir))[0]
        return TwinRun(
            record_steps=arrays["record_steps"],
            # Stored as trained (float32): the certificate starts from exactly the trial's weights.
            trajectories=np.stack([arrays["empirical"], arrays["reference"]]),
            curves={},
            final={"train/loss_clipped": run_metrics["train/loss_clipped"]},
            grad_norms=arrays["grad_norms"],
            model=model,
            n_parameters=count_parameters(model),
            sketch_dim=int(arrays["sketch_dim"]),
        )


def read_model(folder: Path) -> tuple[torch.nn.Module, ModelSpec]:
    """The S-run's final model from a trial's ``model/`` artifact folder (``spec.json`` +
    ``state_dict.pt``), in the mode ``build_model`` leaves it, as the trial's own final model was."""
    spec = ModelSpec.from_dict(json.loads((folder / "spec.json").read_text()))
    model = build_model(spec)
    model.load_state_dict(torch.load(folder / "state_dict.pt", weights_only=True))
    return model, spec


# ---------------------------------------------------------------------------------------------
# After a study run
# ---------------------------------------------------------------------------------------------


#: ``[diagnostics] trials`` values that ``run`` certifies after the study, and which trials they mean.
AFTER_STUDY_SCOPES = {
    "recommended": "the recommended trial and the runner-up",
    "front": "the Pareto front",
}


def after_study_trials(study: optuna.Study, cfg: StudyConfig) -> list[int]:
    """The trials ``run`` certifies when its trials are done: with ``trials = "recommended"`` the
    first two of the study's rank rule (``[rank]``, as ``run`` and ``rank`` recommend), with
    ``"front"`` the Pareto front; none otherwise, or while no trial has finished."""
    if cfg.diagnostics.trials == "front":
        return front_trials(study)
    if cfg.diagnostics.trials != "recommended" or not complete_trials(study):
        return []
    _, order, _ = ranked_table(study, cfg.rank)
    return order[:2]


def certify_front(
    study: optuna.Study,
    cfg: StudyConfig,
    tracker: Tracker,
    data: Dataset,
    lock: Callable[[], contextlib.AbstractContextManager],
    say: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    on_pending: Callable[[list[int]], None] | None = None,
) -> list[Certified]:
    """What ``run`` does when its trials are done: certify :func:`after_study_trials` that lack a
    certificate (nothing when the trials had it already). ``say`` gets a header line, then one line
    per certified trial; ``on_pending`` gets the trials to certify between the two (for a progress
    bar)."""
    if cfg.diagnose_every_trial or not has_work(cfg):
        return []
    runs = {n: _get_run(tracker, n, _run_id(study, n)) for n in after_study_trials(study, cfg)}
    pending = [n for n, run in runs.items() if not is_done(run)]
    if not pending:
        return []
    if say is not None:
        shown, scope = ", ".join(map(str, pending)), cfg.diagnostics.trials
        setting = f'[diagnostics] trials = "{scope}"'
        say(f"certifying {AFTER_STUDY_SCOPES[scope]} after the study ({setting}): trials {shown}")
    if on_pending is not None:
        on_pending(pending)
    on_trial = (lambda result: say(result.line())) if say is not None else None
    return certify(study, cfg, tracker, pending, data=data, on_trial=on_trial, lock=lock, stop=stop)


def study_lock(study: optuna.Study, url: str | None) -> StudyLock:
    """The lock ``run`` takes for ``study`` (stored at ``url``), for certifying outside a run."""
    return StudyLock(study._storage, url, study.study_name)


def _run_id(study: optuna.Study, number: int) -> str:
    return certifiable(study, number).user_attrs["mlflow_run_id"]


def format_results(results: list[Certified]) -> str:
    """The table ``hsgd-tune certify`` prints: one row per trial, then what "vacuous" means. Seconds
    only for the trials computed now: a certificate found on its run shows when it was computed
    instead, not an old duration that would read as this command's."""
    header = f"{'trial':>5}  {'certificate/bound':>17}  {'certificate/trivial':>19}  {'vacuous':>7}  "
    header += f"{'seconds':>7}  computed"
    rows = [header]
    for r in results:
        seconds = _num(r.seconds, ".2f") if r.computed else "-"
        when = r.when if r.computed or r.when.startswith("skipped") else f"earlier ({r.when})"
        rows.append(
            f"{r.trial:>5}  {_num(r.bound):>17}  {_num(r.trivial):>19}  {r.vacuous:>7}  {seconds:>7}  {when}"
        )
    return "\n".join([*rows, f"{VACUOUS_NOTE}."])


#: What "vacuous" means in the table (the threshold is diagnostics.py's hsgd.vacuous.certificate tag).
VACUOUS_NOTE = (
    "vacuous: the certificate is at least min(trivial, 0.5), i.e. it cannot rule out an error as large "
    "as a constant guess's (trivial = 1 − 1/k for k classes) or a coin flip's"
)


def _num(value: float, fmt: str = ".4g") -> str:
    return format(value, fmt) if math.isfinite(value) else "-"
