"""Tests for hsgd_tune.tracking: batching within MLflow's limits, against a real SQLite store."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from hsgd_tune.errors import StorageError
from hsgd_tune.tracking import Tracker, _batches


def test_batches_respect_every_limit_and_keep_every_entry():
    metrics = [Metric(f"m{i}", float(i), 0, 0) for i in range(2100)]
    params = [Param(f"p{i}", str(i)) for i in range(150)]
    tags = [RunTag(f"t{i}", str(i)) for i in range(30)]
    batches = list(_batches(metrics, params, tags))
    for b in batches:
        assert len(b["params"]) <= MAX_PARAMS_TAGS_PER_BATCH and len(b["tags"]) <= MAX_PARAMS_TAGS_PER_BATCH
        assert len(b["metrics"]) + len(b["params"]) + len(b["tags"]) <= MAX_ENTITIES_PER_BATCH
    assert [m for b in batches for m in b["metrics"]] == metrics
    assert [p for b in batches for p in b["params"]] == params
    assert [t for b in batches for t in b["tags"]] == tags
    # 2280 entities need at least 3 calls of 1000; packing params and tags with metrics gives 3.
    assert len(batches) == 3
    assert list(_batches([], [], [])) == []


def test_finish_trial_logs_everything_and_ends_the_run(workdir):
    tracker = Tracker()
    exp = tracker.experiment_id("hsgd-tracking-test")
    parent = tracker.open_parent(exp, "s", params={}, tags={})
    run_id = tracker.start_trial(exp, parent, "s", 3, {f"p{i}": i for i in range(120)})
    metrics = {f"m{i}": float(i) for i in range(1200)} | {"bad": math.nan}
    curves = {"val/loss": ([0, 10, 20], [3.0, 2.0, 1.0])}
    tracker.finish_trial(run_id, "COMPLETE", {"hsgd.x": "y"}, metrics, step=20, curves=curves)

    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(run.data.params) == 120 and run.data.params["p119"] == "119"
    assert len([k for k in run.data.metrics if k.startswith("m")]) == 1200
    assert run.data.tags["optuna.state"] == "COMPLETE" and run.data.tags["hsgd.x"] == "y"
    assert run.data.tags["hsgd.nonfinite.bad"] == "nan" and "bad" not in run.data.metrics
    history = tracker.client.get_metric_history(run_id, "val/loss")
    assert [(h.step, h.value) for h in history] == [(0, 3.0), (10, 2.0), (20, 1.0)]
    assert tracker.client.get_metric_history(run_id, "m5")[0].step == 20


def _finish_args(tmp_path, name: str) -> tuple[dict, Path]:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "trial.json").write_text("{}")
    metrics = {f"m{i}": float(i) for i in range(300)}
    return {"tags": {"k": "v"}, "metrics": metrics, "step": 7, "curves": {"c": ([0, 7], [1.0, 0.5])}}, folder


def test_background_writer_ends_runs_like_the_synchronous_path(workdir, tmp_path):
    tracker = Tracker()
    exp = tracker.experiment_id("hsgd-writer-test")
    parent = tracker.open_parent(exp, "s", params={}, tags={})
    sync_id = tracker.start_trial(exp, parent, "s", 0, {"a": 1})
    args, folder = _finish_args(tmp_path, "sync")
    tracker.finish_trial(sync_id, "COMPLETE", **args, artifacts=folder)
    assert not folder.exists()  # logged, then deleted

    with tracker.background():
        background_ids = [tracker.start_trial(exp, parent, "s", n, {"a": n}) for n in (1, 2)]
        folders = []
        for run_id in background_ids:
            args, folder = _finish_args(tmp_path, run_id)
            folders.append(folder)
            tracker.finish_trial(run_id, "COMPLETE", **args, artifacts=folder)
        assert tracker.pending_runs == set(background_ids)
    # Leaving the block waited for the writer: everything is there now.
    assert tracker.pending_runs == set() and not any(f.exists() for f in folders)
    expected = tracker.client.get_run(sync_id).data
    for run_id in background_ids:
        run = tracker.client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.metrics == expected.metrics
        assert run.data.tags["optuna.state"] == "COMPLETE" and run.data.tags["k"] == "v"
        assert [a.path for a in tracker.client.list_artifacts(run_id)] == ["trial.json"]


def test_background_writer_failure_is_a_storage_error_naming_the_run(workdir):
    tracker = Tracker()
    with pytest.raises(StorageError, match="run no-such-run"), tracker.background():
        tracker.finish_trial("no-such-run", "COMPLETE", metrics={"m": 1.0})


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state  # a zombie has exited; only its parent's wait is missing


def test_writer_process_does_not_outlive_a_killed_parent(workdir):
    """A worker killed with SIGKILL cannot close its writer; the writer must still go away."""
    parent = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "from hsgd_tune.writer import BackgroundWriter, FinishJob\n"
            "w = BackgroundWriter(sys.argv[1])\n"
            "w.submit(FinishJob('no-such-run', 'COMPLETE'))\n"
            "print(w._process.pid, flush=True)\n"
            "os._exit(0)\n",
            f"sqlite:///{workdir / 'mlflow.db'}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,  # the writer inherits the parent's stdout: this returns once both are gone
    )
    pid = int(parent.stdout)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)
