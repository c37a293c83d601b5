"""Ctrl-C on ``run`` and ``worker``, with real signals on a real process (README, "Scaling out").

First SIGINT: the running trial finishes, then the process stops (exit 130 = 128 + SIGINT when the
budget is not met). Second SIGINT: it stops at once; the trial is failed, its MLflow run FAILED,
and its parameters are queued so that the next run of the study runs them first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tiny_study import TINY_STUDY


def _study_text(steps: int) -> str:
    text = TINY_STUDY.replace("steps = 60", f"steps = {steps}").replace("n_trials = 5", "n_trials = 3")
    return text + '\n[diagnostics]\ntrials = "none"\n'


def _start(folder: Path, command: str, steps: int) -> subprocess.Popen:
    (folder / "tiny.toml").write_text(_study_text(steps), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, "-m", "hsgd_tune.cli", command, "tiny.toml"]
    argv += ["--quiet"] if command == "run" else ["--threads", "1"]
    return subprocess.Popen(
        argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _study(folder: Path) -> optuna.Study | None:
    journal = folder / "mlruns" / "optuna-journal.log"
    if not journal.exists():
        return None
    storage = JournalStorage(JournalFileBackend(str(journal)))
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    return optuna.load_study(study_name="tiny", storage=storage) if "tiny" in names else None


def _wait_for_running_trial(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        study = _study(folder)
        if study is not None and any(t.state == TrialState.RUNNING for t in study.trials):
            time.sleep(0.3)  # inside the trial's training, past its bookkeeping
            return
        time.sleep(0.2)
    pytest.fail("no trial started")


def _runs(folder: Path) -> dict[str, str]:
    """trial run name → status."""
    client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hsgd-tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.`hsgd.role` = 'trial'")
    return {r.info.run_name: r.info.status for r in runs}


@pytest.mark.parametrize("command", ["run", "worker"])
def test_first_ctrl_c_lets_the_running_trial_finish_then_stops(tmp_path, command):
    proc = _start(tmp_path, command, steps=6000)  # a trial of a few seconds: caught while running
    _wait_for_running_trial(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "finishing the running trial" in err
    states = [t.state for t in _study(tmp_path).trials]
    assert states == [TrialState.COMPLETE], states  # finished, and no other trial started
    assert _runs(tmp_path) == {"trial-0000": "FINISHED"}


@pytest.mark.parametrize("command", ["run", "worker"])
def test_second_ctrl_c_stops_now_fails_the_trial_and_resume_reruns_its_parameters(tmp_path, command):
    proc = _start(tmp_path, command, steps=200_000)  # a trial that would outlast the test
    _wait_for_running_trial(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    trials = _study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params  # queued again, to be run first on resume
    assert _runs(tmp_path) == {"trial-0000": "FAILED"}
