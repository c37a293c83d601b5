"""Tests for hsgd_tune.track.tracker: batching within MLflow's limits, against a real SQLite store."""

from __future__ import annotations

import math

from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from hsgd_tune.track.tracker import Tracker, _batches


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


def test_finish_trial_logs_the_artifacts_folder_then_deletes_it(workdir, tmp_path):
    tracker = Tracker()
    exp = tracker.experiment_id("hsgd-artifacts-test")
    parent = tracker.open_parent(exp, "s", params={}, tags={})
    run_id = tracker.start_trial(exp, parent, "s", 0, {"a": 1})
    folder = tmp_path / "artifacts"
    (folder / "model").mkdir(parents=True)
    (folder / "trial.json").write_text("{}")
    (folder / "model" / "spec.json").write_text("{}")
    tracker.finish_trial(run_id, "FAIL", {"hsgd.fail_reason": "x"}, artifacts=folder)
    assert not folder.exists()
    assert sorted(a.path for a in tracker.client.list_artifacts(run_id)) == ["model", "trial.json"]
    assert tracker.client.get_run(run_id).info.status == "FAILED"
