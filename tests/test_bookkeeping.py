"""Bookkeeping at its floor (issue #17): one Optuna write for a trial's attributes, read back by
every reader exactly as one ``set_user_attr`` per attribute would have left them."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from hsgd_tune.search.study import set_user_attrs

ATTRS = {"bound/risk_bound": 12.5, "val/loss": 0.21, "worker": {"pid": 7}, "note": "x"}


def storages(tmp_path):
    journal = tmp_path / "journal.log"
    return {
        "journal": (lambda: JournalStorage(JournalFileBackend(str(journal)))),
        "sqlite": (lambda: optuna.storages.get_storage(f"sqlite:///{tmp_path / 'optuna.db'}")),
        "memory": (lambda: optuna.storages.InMemoryStorage()),
    }


@pytest.mark.parametrize("kind", ["journal", "sqlite", "memory"])
def test_batched_attrs_equal_one_call_per_attribute_and_persist(kind, tmp_path):
    make = storages(tmp_path)[kind]
    storage = make()
    study = optuna.create_study(study_name="s", storage=storage)

    def one_by_one(trial):
        for k, v in ATTRS.items():
            trial.set_user_attr(k, v)
        return 0.0

    def batched(trial):
        set_user_attrs(trial, ATTRS)
        assert trial.user_attrs == ATTRS  # the trial object sees them at once, as with set_user_attr
        return 0.0

    study.optimize(one_by_one, n_trials=1)
    study.optimize(batched, n_trials=1)
    reread = optuna.load_study(study_name="s", storage=make() if kind != "memory" else storage)
    first, second = reread.trials
    assert first.user_attrs == second.user_attrs == ATTRS


def test_journal_gets_one_append_for_all_attributes(tmp_path, monkeypatch):
    backend = JournalFileBackend(str(tmp_path / "journal.log"))
    trial = optuna.create_study(storage=JournalStorage(backend)).ask()
    appends = []
    real = backend.append_logs
    monkeypatch.setattr(backend, "append_logs", lambda logs: appends.append(len(logs)) or real(logs))
    set_user_attrs(trial, ATTRS)
    assert appends == [len(ATTRS)]


def test_rdb_writes_all_attributes_in_one_transaction(tmp_path):
    storage = RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    commits = []
    sqlalchemy.event.listen(storage.engine, "commit", lambda conn: commits.append(1))
    set_user_attrs(trial, ATTRS)
    assert len(commits) == 1
    assert storage.get_trial(trial._trial_id).user_attrs == ATTRS


def test_local_store_is_in_wal_mode_and_trial_artifacts_are_written_in_place(workdir):
    import sqlite3

    from hsgd_tune.track.tracker import Tracker

    tracker = Tracker()
    mode = sqlite3.connect(workdir / "mlruns" / "mlflow.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    exp = tracker.experiment_id("e")
    run_id = tracker.start_trial(exp, tracker.open_parent(exp, "s", {}, {}), "s", 0, {})
    folder = tracker.local_artifact_dir(run_id)
    assert folder is not None and folder.is_relative_to(workdir / "mlruns" / "artifacts")
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("x")
    tracker.finish_trial(run_id, "COMPLETE")
    assert [f.path for f in tracker.client.list_artifacts(run_id)] == ["a.txt"]  # MLflow sees it
