"""Optuna: storage, sampler, the search space, and creating or resuming a study.

A study remembers what it was created with — the config's fingerprint and |Λ|, the number of
configurations δ is divided over (grid.py) — so a resumed or extended study keeps every trial's
probability statement valid. Every sampled value is snapped to Λ before Optuna stores it, so the
sampler sees the configuration that was trained, and a configuration evaluated twice is one statement.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import BaseStorage, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from hsgd_tune.errors import ConfigError
from hsgd_tune.redact import redact
from hsgd_tune.search.storage import DEFAULT_JOURNAL, open_storage
from hsgd_tune.studyfile import grid
from hsgd_tune.studyfile.config import Knob, StudyConfig

#: A trial that failed by our own rule (e.g. divergence) carries this user attribute; it counts
#: towards the budget. One that failed because its worker died does not, and is simply re-run.
FAIL_REASON = "fail_reason"

#: Trial states whose configuration is taken: finished, running elsewhere, or failed by our rule.
_HOLDING = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL)


def make_sampler(
    cfg: StudyConfig, n_existing: int, worker_entropy: int | None = None
) -> optuna.samplers.BaseSampler:
    """The study's sampler. The seed moves on with the trials already run, so a resumed study does
    not propose its first random points again; ``worker_entropy`` (one value per worker process)
    keeps workers that join a study at the same moment from proposing the same points."""
    words = [cfg.seed, n_existing] + ([worker_entropy] if worker_entropy is not None else [])
    seed = int(np.random.SeedSequence(words).generate_state(1)[0])
    kind = cfg.sampler.kind
    if kind == "random":
        inner = optuna.samplers.RandomSampler(seed=seed)
    elif kind == "grid":
        inner = _GridSampler(grid_space(cfg), seed=seed)
    elif kind == "nsga2":
        inner = optuna.samplers.NSGAIISampler(seed=seed)
    else:
        inner = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return SnappingSampler(inner, cfg)


#: Draws the inner sampler gets to propose a configuration no other trial has, before a repeat is
#: accepted (once every grid point is taken, or the inner sampler insists).
FRESH_DRAWS = 10
#: Grid neighbours looked at for a free configuration when the draws all land on taken ones.
NEAREST_SEARCH = 100_000


class SnappingSampler(optuna.samplers.BaseSampler):
    """Any sampler, its proposals snapped to the configuration grid Λ before Optuna stores them, and
    kept off the configurations other trials already have.

    The trial's stored params are then the configuration that is trained and certified, and the
    inner sampler learns from those values. A configuration is deterministic given the study (its
    seeds derive from it), so training one a second time would only repeat its numbers: when the
    snapped proposal is a configuration that a finished, failed-by-rule or running trial already has,
    the inner sampler draws the whole configuration again (from its own random stream), up to
    :data:`FRESH_DRAWS` times, and then the nearest free grid point is trained instead. Only a grid
    with no free point left repeats a configuration. The grid sampler walks distinct points by itself."""

    def __init__(self, inner: optuna.samplers.BaseSampler, cfg: StudyConfig):
        self.inner = inner
        self.knobs = {knob.name: knob for knob in cfg.search.all_knobs()}
        # The grid sampler walks distinct points by itself, keyed by trial: it is left as it is.
        self.walks_grid = isinstance(inner, optuna.samplers.GridSampler)

    def _snap(self, name: str, value: Any) -> Any:
        knob = self.knobs.get(name)
        return grid.snap(knob, value) if knob is not None else value

    def infer_relative_search_space(self, study, trial):
        if self.walks_grid:
            return self.inner.infer_relative_search_space(study, trial)
        # Every knob is drawn here, jointly, so that a configuration already taken can be drawn again whole.
        return {name: distribution(knob) for name, knob in self.knobs.items()}

    def sample_relative(self, study, trial, search_space):
        if self.walks_grid:
            return self.inner.sample_relative(study, trial, search_space)
        joint = self.inner.infer_relative_search_space(study, trial)
        taken = self._taken(study, trial)
        for _ in range(FRESH_DRAWS):
            proposed = self.inner.sample_relative(
                study, trial, {k: d for k, d in joint.items() if k in search_space}
            )
            for name, dist in search_space.items():
                if name not in proposed:  # what the inner sampler draws one knob at a time
                    proposed[name] = self.inner.sample_independent(study, trial, name, dist)
            proposed = {name: self._snap(name, value) for name, value in proposed.items()}
            if self._key(proposed) not in taken:
                return proposed
        # The sampler insists (TPE near its optimum): the nearest free configuration instead, if any.
        return self._nearest_free(proposed, taken) or proposed

    def sample_independent(self, study, trial, param_name, param_distribution):
        value = self.inner.sample_independent(study, trial, param_name, param_distribution)
        return self._snap(param_name, value)

    def _key(self, params: dict[str, Any]) -> tuple:
        return tuple(params.get(name) for name in self.knobs)

    def _taken(self, study, trial) -> set[tuple]:
        """The configurations other trials have: finished, running, or failed by our rule (a dead
        worker's trial is queued again with its configuration, so it does not count)."""
        return {
            self._key(other.params)
            for other in study.get_trials(deepcopy=False, states=_HOLDING)
            if other.number != trial.number
            and not (other.state == TrialState.FAIL and FAIL_REASON not in other.user_attrs)
        }

    def _nearest_free(self, proposed: dict[str, Any], taken: set[tuple]) -> dict[str, Any] | None:
        """The configuration fewest grid steps from ``proposed`` (steps summed over the knobs; on a
        log scale a step is a constant ratio) that no trial has; None when none is found within
        :data:`NEAREST_SEARCH` candidates (a nearly exhausted grid: the repeat is trained)."""
        grids = [grid.knob_values(knob) for knob in self.knobs.values()]
        start = [values.index(proposed[name]) for values, name in zip(grids, self.knobs, strict=True)]
        looked = 0
        for radius in range(1, sum(len(values) for values in grids)):
            for step in _steps(len(grids), radius):
                index = [i + d for i, d in zip(start, step, strict=True)]
                if all(0 <= i < len(values) for i, values in zip(index, grids, strict=True)):
                    candidate = tuple(values[i] for values, i in zip(grids, index, strict=True))
                    if candidate not in taken:
                        return dict(zip(self.knobs, candidate, strict=True))
                looked += 1
                if looked >= NEAREST_SEARCH:
                    return None
        return None

    def before_trial(self, study, trial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its ``study.stop()`` once the grid is walked: Optuna allows that
    call only inside ``study.optimize``, and our workers ask and tell (worker.py), stopping at the
    study's budget instead. A budget beyond the grid re-evaluates grid points."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def grid_space(cfg: StudyConfig) -> dict[str, list[Any]]:
    """The grid the grid sampler walks: choices as given, ranges as ``grid_points`` values, each
    snapped to Λ (a coarser sub-grid of it)."""
    return {
        knob.name: sorted({grid.snap(knob, v) for v in _grid_values(knob, cfg.sampler.grid_points)})
        if knob.kind != "categorical"
        else list(knob.choices)
        for knob in cfg.search.all_knobs()
    }


def _grid_values(knob: Knob, points: int) -> list[Any]:
    if knob.kind == "categorical":
        return list(knob.choices)
    if knob.kind == "int" and knob.log:
        powers = [2**k for k in range(64) if knob.low <= 2**k <= knob.high]
        return sorted({int(knob.low), *powers, int(knob.high)})
    space = np.geomspace if knob.log else np.linspace
    values = space(knob.low, knob.high, points)
    return sorted({int(round(v)) for v in values}) if knob.kind == "int" else [float(v) for v in values]


def _steps(dimensions: int, radius: int) -> Iterator[tuple[int, ...]]:
    """Every integer vector of ``dimensions`` entries whose absolute values sum to ``radius``."""
    if dimensions == 1:
        yield from {(radius,), (-radius,)}
        return
    for first in range(-radius, radius + 1):
        for rest in (
            _steps(dimensions - 1, radius - abs(first)) if radius - abs(first) else [(0,) * (dimensions - 1)]
        ):
            yield (first, *rest)


def distribution(knob: Knob) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution :func:`suggest` asks ``knob`` from (they must be equal: Optuna uses a
    sampler's joint draw only for parameters suggested with the distribution it was drawn from)."""
    if knob.kind == "categorical":
        return optuna.distributions.CategoricalDistribution(list(knob.choices))
    if knob.kind == "int":
        return optuna.distributions.IntDistribution(int(knob.low), int(knob.high), log=knob.log)
    return optuna.distributions.FloatDistribution(knob.low, knob.high, log=knob.log)


def suggest(trial: optuna.Trial, knob: Knob) -> Any:
    if knob.kind == "categorical":
        return trial.suggest_categorical(knob.name, list(knob.choices))
    if knob.kind == "int":
        return trial.suggest_int(knob.name, int(knob.low), int(knob.high), log=knob.log)
    return trial.suggest_float(knob.name, knob.low, knob.high, log=knob.log)


def sample_params(trial: optuna.Trial, cfg: StudyConfig) -> dict[str, Any]:
    """The trial's configuration λ, every value a point of Λ (a statement was paid for each; grid.py).

    The study's :class:`SnappingSampler` proposes grid points already; snapping here again also
    covers a trial enqueued by hand with values off the grid."""
    return {knob.name: grid.snap(knob, suggest(trial, knob)) for knob in cfg.search.all_knobs()}


def lookup_study(url: str | None, name: str) -> optuna.Study | None:
    """The existing study ``name`` in the storage at ``url``, or None; a look-up creates nothing
    (opening a journal file that does not exist would create it)."""
    if (url is None or "://" not in url) and not Path(url or DEFAULT_JOURNAL).exists():
        return None
    return find_study(open_storage(url), name)


def find_study(storage: BaseStorage, name: str) -> optuna.Study | None:
    if name not in {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}:
        return None
    return optuna.load_study(study_name=name, storage=storage)


def create_or_resume(
    cfg: StudyConfig, storage: BaseStorage, worker_entropy: int | None = None
) -> optuna.Study:
    """Create the study, or resume it when the same config made it; refuse a changed config.
    ``worker_entropy``: see :func:`make_sampler` (None for a study run by one process)."""
    study = find_study(storage, cfg.name)
    if study is None:
        study = optuna.create_study(
            study_name=cfg.name,
            storage=storage,
            directions=["minimize"] * len(cfg.objectives),
            load_if_exists=True,  # another worker may have created it a moment ago
        )
        if "fingerprint" not in study.user_attrs:
            study.set_user_attr("fingerprint", cfg.fingerprint())
            study.set_user_attr("grid_size", cfg.grid_size)
            study.set_user_attr("objectives", list(cfg.objectives))
            study.set_user_attr("config", json.dumps(stored_dict(cfg)))
    _check_resumable(cfg, study)
    study.sampler = make_sampler(cfg, len(study.trials), worker_entropy)
    return study


def check_union_over_grid(study: optuna.Study, file: Path | None = None) -> None:
    """Refuse a study made before the configuration-grid union: its δ was split over trial numbers
    (``max_trials``), which an adaptive sampler invalidates, and its values are not on a grid."""
    if "grid_size" not in study.user_attrs and "max_trials" in study.user_attrs:
        raise ConfigError(
            "name",
            f"names a study made by an older hsgd-tune that split δ over max_trials = "
            f"{study.user_attrs['max_trials']} trials (not valid under an adaptive sampler); it can be "
            "ranked and reported but not run or certified: use a new name",
            study.study_name,
            file=file,
        )


def stored_dict(cfg: StudyConfig) -> dict[str, Any]:
    """The config as the study keeps it: the storage URL without its password."""
    raw = cfg.to_dict()
    raw["run"]["storage"] = redact(raw["run"]["storage"])
    return raw


def _check_resumable(cfg: StudyConfig, study: optuna.Study) -> None:
    check_union_over_grid(study, cfg.source_file)
    stored = study.user_attrs.get("fingerprint")
    if stored != cfg.fingerprint():
        raise ConfigError(
            "name",
            f"names an existing study made from another config (fingerprint {stored}); "
            "use a new name to change data, model, search, training, bound, objectives or sampler",
            cfg.name,
            file=cfg.source_file,
        )


def counts_towards_budget(trial: FrozenTrial) -> bool:
    """Finished trials count; a trial that failed because its process died does not."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and FAIL_REASON in trial.user_attrs


def trials_done(study: optuna.Study) -> int:
    return sum(counts_towards_budget(t) for t in study.get_trials(deepcopy=False))


# -- liveness of local workers on storages without heartbeats ---------------------------------


def worker_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def fail_orphaned_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Mark FAIL the RUNNING trials whose worker process on this host is gone.

    The journal storage has no heartbeats, so a killed local run would leave its trial RUNNING
    forever; the worker's pid, stored with the trial, tells. Returns the trials it failed.
    """
    host = socket.gethostname()
    orphaned = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", {})
        if worker.get("host") == host and not _pid_alive(worker.get("pid", -1)):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            orphaned.append(trial)
    return orphaned


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """``trial.set_user_attr`` for every item, in one storage write where the storage allows it.

    Optuna writes each attribute on its own: a journal append with an fsync, or a database
    transaction, about 1–4 ms each. Here the journal gets all of them in one append (one lock, one
    fsync; each record still one attribute, as Optuna's replay expects) and a database one
    transaction. The records are exactly what ``set_user_attr`` would write, so every reader sees the
    same attributes. Other storages fall back to one call per attribute.
    """
    storage = trial.storage
    backend = getattr(storage, "_backend", None)  # _CachedStorage wraps an RDBStorage
    if isinstance(storage, JournalStorage) and hasattr(storage, "_replay_result"):
        _journal_user_attrs(storage, trial._trial_id, attrs)
    elif isinstance(backend, optuna.storages.RDBStorage):
        _rdb_user_attrs(backend, trial._trial_id, attrs)
    else:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial._trial_id, key, value)
    trial._cached_frozen_trial.user_attrs.update(attrs)  # what set_user_attr also keeps


def _journal_user_attrs(storage: JournalStorage, trial_id: int, attrs: dict[str, Any]) -> None:
    from optuna.storages.journal._storage import JournalOperation

    with storage._thread_lock:
        worker_id = storage._replay_result.worker_id
        logs = [
            {
                "op_code": JournalOperation.SET_TRIAL_USER_ATTR,
                "worker_id": worker_id,
                "trial_id": trial_id,
                "user_attr": {key: value},
            }
            for key, value in attrs.items()
        ]
        storage._backend.append_logs(logs)
        storage._sync_with_backend()


def _rdb_user_attrs(storage: optuna.storages.RDBStorage, trial_id: int, attrs: dict[str, Any]) -> None:
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(storage.scoped_session, True) as session:
        for key, value in attrs.items():
            storage._set_trial_attr_without_commit(
                session, models.TrialUserAttributeModel, trial_id, key, value
            )
