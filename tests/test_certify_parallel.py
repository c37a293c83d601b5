"""Certificates computed side by side in threads (issue #17) are bit for bit the ones a sequential
certify logs: same code, same recorded arrays, one torch thread each."""

from __future__ import annotations

import shutil

import optuna
import pytest
from tiny_study import TINY_STUDY, write_tiny_study

from hsgd_tune.search.certification import (
    IN_TURN_MODELS,
    PARALLEL_FROM,
    certify,
    complete_trials,
    parallel_workers,
)
from hsgd_tune.search.runner import run_study
from hsgd_tune.search.storage import open_storage
from hsgd_tune.studyfile.config import load_study
from hsgd_tune.track.tracker import Tracker

STUDY = (
    TINY_STUDY
    + """
[certificate]
steps = 20
mc_draws = 2

[diagnostics]
noise_draws = 16
trials = "none"
"""
)


def certify_all(folder, monkeypatch, workers: int) -> dict[int, dict]:
    monkeypatch.chdir(folder)
    cfg = load_study(folder / "tiny.toml")
    study = optuna.load_study(study_name="tiny", storage=open_storage(None))
    numbers = complete_trials(study)[:3]
    results = certify(study, cfg, Tracker(), numbers, workers=workers)
    assert [r.trial for r in results] == numbers and all(r.computed for r in results)
    runs = {n: Tracker().client.get_run(study.trials[n].user_attrs["mlflow_run_id"]) for n in numbers}
    return {
        n: {k: v for k, v in run.data.metrics.items() if k.startswith(("certificate/", "tail/", "analytic/"))}
        for n, run in runs.items()
    }


def test_parallel_certificates_equal_sequential_ones_bit_for_bit(tmp_path, monkeypatch):
    one = tmp_path / "sequential"
    one.mkdir()
    with monkeypatch.context() as mp:
        mp.chdir(one)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run_study(load_study(write_tiny_study(one, STUDY)), progress=False)
    two = tmp_path / "parallel"
    shutil.copytree(one, two)  # the same trials; the runs' artifacts stay where they are (absolute URIs)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sequential = certify_all(one, monkeypatch, workers=1)
    parallel = certify_all(two, monkeypatch, workers=2)
    assert sequential and all("certificate/bound" in m for m in sequential.values())
    assert parallel == sequential  # exact float equality, every metric


@pytest.mark.parametrize(
    "cores, load, trials, expected",
    [
        (2, 0.9, PARALLEL_FROM, 2),  # after a one-thread study on a quiet machine: its own load
        (2, 1.4, PARALLEL_FROM, 2),  # the same, the 1-minute average still catching up
        (2, 1.6, PARALLEL_FROM, 1),  # more than half a core taken by something else
        (2, 0.9, PARALLEL_FROM - 1, 1),  # one trial: nothing to share
        (2, 2.5, 12, 1),  # another job keeps a core busy
        (1, 0.0, 12, 1),
        (16, 1.0, 5, 5),  # at most one thread per trial
        (16, 9.0, 20, 8),
    ],
)
def test_parallel_workers_only_on_idle_cores(cores, load, trials, expected, monkeypatch):
    monkeypatch.setattr("hsgd_tune.search.certification.available_cores", lambda: cores)
    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    assert parallel_workers(trials) == expected
    assert parallel_workers(trials, "cnn") == expected


@pytest.mark.parametrize("kind", IN_TURN_MODELS)
def test_interpreter_bound_models_are_certified_in_turn_even_on_idle_cores(kind, monkeypatch):
    monkeypatch.setattr("hsgd_tune.search.certification.available_cores", lambda: 16)
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))
    assert parallel_workers(20, "cnn") == 16
    assert parallel_workers(20, kind) == 1


def test_once_stopped_parallel_certificates_start_no_trial(tmp_path, monkeypatch):
    """A stop set before the threads pick up their trials: none computes, none is logged."""
    import threading

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_study(write_tiny_study(tmp_path, STUDY))
    run_study(cfg, progress=False)
    study = optuna.load_study(study_name="tiny", storage=open_storage(None))
    numbers = complete_trials(study)
    stop = threading.Event()
    stop.set()
    assert certify(study, cfg, Tracker(), numbers, stop=stop, workers=2) == []
    runs = [Tracker().client.get_run(study.trials[n].user_attrs["mlflow_run_id"]) for n in numbers]
    assert not any("certificate/bound" in run.data.metrics for run in runs)
