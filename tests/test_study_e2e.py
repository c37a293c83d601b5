"""End to end: real Optuna journal file, real MLflow SQLite store, real training. No mocks.

Every test works in its own temporary directory (the default ``mlruns/`` lands there). A freshly
migrated MLflow database is copied in rather than created, which saves MLflow's several seconds of
schema migrations per test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from hsgd_tune.data.datasets import load_dataset
from hsgd_tune.errors import ConfigError
from hsgd_tune.search.runner import run_study
from hsgd_tune.search.storage import open_storage
from hsgd_tune.search.study import FAIL_REASON, trials_done
from hsgd_tune.search.trials import BOUND_COLUMNS, trials_table
from hsgd_tune.studyfile import grid
from hsgd_tune.studyfile.config import Knob, load_study, parse_study, with_run
from hsgd_tune.track.tracker import Tracker
from hsgd_tune.train.models import ModelSpec, build_model
from hsgd_tune.train.twin import per_example_loss

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


BOUND_TERMS = (
    "bound/decoupling_distance",
    "bound/synchronous_distance",
    "bound/lipschitz",
    "bound/complexity",
    "bound/gap_bound",
    "bound/train_risk_clipped",
    "bound/risk_bound",
    "bound/loss_clip",
    "bound/delta_trajectory",
    "bound/n_points",
    "bound/lipschitz_pop",
    "bound/gap_bound_uniform",
    "bound/risk_bound_max",
    "certificate/heldout_error",
    "certificate/heldout_error_max",
)

TINY_TOML = """\
name = "{name}"
seed = 0

[data]
source = "digits"
n_train = 150
n_reference = 150
n_val = 150

[model]
kind = "mlp"
widths = [16]

[search.learning_rate]
low = 0.01
high = 0.3

[search.batch_size]
choices = [16, 32]

[training]
steps = 50
record_every = 10

[bound]
lipschitz_subsample = 32

[sampler]
kind = "random"

[run]
n_trials = {n_trials}
"""


def tiny_raw(name: str = "e2e", n_trials: int = 3) -> dict:
    import tomllib

    return tomllib.loads(TINY_TOML.format(name=name, n_trials=n_trials))


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> Path:
    """An empty MLflow database with its schema in place, made once for the module."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _enter_workspace(folder: Path, migrated_db: Path, mp: pytest.MonkeyPatch) -> None:
    (folder / "mlruns").mkdir(parents=True, exist_ok=True)
    shutil.copy(migrated_db, folder / "mlruns" / "mlflow.db")
    mp.chdir(folder)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def workspace(tmp_path, migrated_db, monkeypatch) -> Path:
    _enter_workspace(tmp_path, migrated_db, monkeypatch)
    return tmp_path


def client_for(folder: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")


def load(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(
        study_name=name, storage=open_storage(str(folder / "mlruns" / "optuna-journal.log"))
    )


def runs_of(client: MlflowClient, experiment_name: str):
    exp = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("hsgd.role") == "study"]
    children = [r for r in runs if r.data.tags.get("hsgd.role") == "trial"]
    assert len(parents) + len(children) == len(runs), "every run is a study or a trial run"
    return parents, children


def assert_one_run_per_trial(client: MlflowClient, study: optuna.Study, experiment_name: str):
    """One parent run; exactly one child run per Optuna trial, linked both ways. Returns
    trial number -> run."""
    parents, children = runs_of(client, experiment_name)
    assert len(parents) == 1
    parent = parents[0]
    by_number = {}
    for run in children:
        number = int(run.data.tags["optuna.trial_number"])
        assert number not in by_number, f"trial {number} has two runs"
        by_number[number] = run
        assert run.info.run_name == f"trial-{number:04d}"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    trials = study.get_trials(deepcopy=False)
    assert sorted(by_number) == sorted(t.number for t in trials)
    for t in trials:
        assert t.user_attrs["mlflow_run_id"] == by_number[t.number].info.run_id
    return parent, by_number


def assert_no_nonfinite_metric(client: MlflowClient, runs) -> None:
    for run in runs:
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            assert history, key
            bad = [m.value for m in history if not math.isfinite(m.value)]
            assert not bad, f"{run.info.run_name}: {key} has {bad}"


# ---------------------------------------------------------------------------------------------
# A small study, run once for the module, inspected by several tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_study(tmp_path_factory, migrated_db):
    folder = tmp_path_factory.mktemp("small")
    with pytest.MonkeyPatch.context() as mp:
        _enter_workspace(folder, migrated_db, mp)
        cfg = parse_study(tiny_raw("small", 3), folder)
        summary = run_study(cfg, progress=False)
    return folder, cfg, summary


def test_small_study_runs_and_logs_one_child_run_per_trial(small_study):
    folder, cfg, summary = small_study
    assert (summary.trials_run, summary.trials_done, summary.budget) == (3, 3, 3)
    study = load(folder, cfg.name)
    client = client_for(folder)
    parent, by_number = assert_one_run_per_trial(client, study, cfg.experiment_name)
    assert parent.info.run_id == summary.parent_run_id
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["study/n_complete"] == 3

    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        run = client.get_run(by_number[t.number].info.run_id)
        assert run.info.status == "FINISHED"
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        for key in ("val/loss", *BOUND_TERMS):
            assert key in metrics, key
            assert math.isfinite(metrics[key]), key
        # The Optuna objectives are the logged metrics.
        assert t.values[0] == pytest.approx(metrics["crossfit/loss"], abs=1e-12)
        assert t.values[1] == pytest.approx(metrics["bound/risk_bound"], rel=1e-12)
        assert float(params["learning_rate"]) == t.params["learning_rate"]
        assert int(params["batch_size"]) == t.params["batch_size"]
        assert params["config.training.steps"] == "50"
        assert tags["optuna.state"] == "COMPLETE"
        assert tags["hsgd.theory"] == "plain SGD (inside)"
        assumptions = {k for k in tags if k.startswith("hsgd.assumption.")}
        assert {
            "hsgd.assumption.lipschitz",
            "hsgd.assumption.gap_bound",
            "hsgd.assumption.complexity",
        } <= assumptions
        assert "not certified" in tags["hsgd.assumption.lipschitz"]
        # The val/loss curve runs 0, 10, ..., 50 and ends at the final value.
        history = sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)
        assert sorted({m.step for m in history}) == [0, 10, 20, 30, 40, 50]
        assert history[-1].value == pytest.approx(metrics["val/loss"], abs=1e-12)


def test_artifacts_rebuild_the_model_with_the_logged_val_loss(small_study, tmp_path):
    folder, cfg, _ = small_study
    client = client_for(folder)
    _, by_number = assert_one_run_per_trial(client, load(folder, cfg.name), cfg.experiment_name)
    data = load_dataset(cfg.data, cfg.seed)
    for number, run in by_number.items():
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"trajectories.npz", "model"} <= names
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
            "model/state_dict.pt",
            "model/spec.json",
        }
        local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / f"t{number}")))
        spec = ModelSpec.from_dict(json.loads((local / "model" / "spec.json").read_text()))
        model = build_model(spec)
        model.load_state_dict(torch.load(local / "model" / "state_dict.pt", weights_only=True))
        with torch.no_grad():
            out = model(torch.as_tensor(data.val.x))
            val_loss = per_example_loss(out, torch.as_tensor(data.val.y), data.task).mean().item()
        assert val_loss == pytest.approx(client.get_run(run.info.run_id).data.metrics["val/loss"], abs=1e-5)

        with np.load(local / "trajectories.npz") as npz:
            np.testing.assert_array_equal(npz["record_steps"], [0, 10, 20, 30, 40, 50])
            p = sum(v.numel() for v in model.state_dict().values())
            assert npz["empirical"].shape == npz["reference"].shape == (6, p)
            assert npz["grad_norms"].shape == (2, 6, 32)
            flat = np.concatenate([v.numpy().ravel() for v in model.state_dict().values()])
            np.testing.assert_array_equal(npz["empirical"][-1], flat)


# ---------------------------------------------------------------------------------------------
# Resume, budget, changed config
# ---------------------------------------------------------------------------------------------


def test_resume_continues_the_study_without_duplicates(workspace):
    cfg = parse_study(tiny_raw("resume", 2), workspace)
    assert run_study(cfg, progress=False).trials_run == 2

    bigger = with_run(cfg, n_trials=4)
    summary = run_study(bigger, progress=False)
    assert (summary.trials_run, summary.trials_done) == (2, 4)
    study = load(workspace, cfg.name)
    assert [t.number for t in study.get_trials(deepcopy=False)] == [0, 1, 2, 3]
    client = client_for(workspace)
    parent, by_number = assert_one_run_per_trial(client, study, cfg.experiment_name)
    assert parent.info.run_id == summary.parent_run_id
    # The resumed sampler does not replay the first trials' points (a replay would repeat them in
    # order; single grid points may recur by chance: the learning rates live on a 16-point grid).
    params = [t.params for t in study.get_trials(deepcopy=False)]
    assert params[2:] != params[:2]

    again = run_study(bigger, progress=False)
    assert (again.trials_run, again.trials_done) == (0, 4)
    study = load(workspace, cfg.name)
    assert len(study.trials) == 4
    parent, by_number = assert_one_run_per_trial(client, study, cfg.experiment_name)
    assert parent.info.status == "FINISHED"
    assert all(run.info.status == "FINISHED" for run in by_number.values())

    # Any larger budget extends the study: δ is divided over the configuration grid, not the trials.
    extended = run_study(with_run(cfg, n_trials=5), progress=False)
    assert (extended.trials_run, extended.trials_done) == (1, 5)
    grid_lrs = grid.knob_values(cfg.search.learning_rate)
    assert all(t.params["learning_rate"] in grid_lrs for t in load(workspace, cfg.name).trials)


def test_a_study_made_before_the_grid_union_is_refused_in_one_clear_line(workspace):
    """Its δ was split over max_trials trial numbers, which an adaptive sampler invalidates."""
    cfg = parse_study(tiny_raw("old", 1), workspace)
    storage = open_storage(str(workspace / "mlruns" / "optuna-journal.log"))
    old = optuna.create_study(study_name="old", storage=storage, directions=["minimize"] * 2)
    old.set_user_attr("fingerprint", cfg.fingerprint())
    old.set_user_attr("max_trials", 10)
    with pytest.raises(ConfigError, match="older hsgd-tune that split δ over max_trials = 10") as info:
        run_study(cfg, progress=False)
    assert "\n" not in str(info.value) and len(load(workspace, "old").trials) == 0


def test_changed_search_space_under_the_same_name_is_refused(workspace):
    raw = tiny_raw("changed", 1)
    cfg = parse_study(raw, workspace)
    run_study(cfg, progress=False)
    raw["search"]["learning_rate"]["high"] = 0.5
    changed = parse_study(raw, workspace)
    with pytest.raises(ConfigError, match="another config") as info:
        run_study(changed, progress=False)
    assert info.value.key == "name"
    study = load(workspace, cfg.name)
    assert len(study.trials) == 1  # nothing was run or lost
    _, children = runs_of(client_for(workspace), cfg.experiment_name)
    assert len(children) == 1


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------


def test_diverging_study_fails_trials_cleanly_and_counts_them(workspace):
    base = load_study(REPO / "studies" / "diverging.toml")
    assert base.search.learning_rate.high >= 10 * base.search.learning_rate.low
    # Scaled down: fewer examples and steps; a 3-point grid over the file's learning-rate range
    # (0.05, 1.58, 50), so at least one trial surely converges and one surely diverges.
    cfg = dataclasses.replace(
        base,
        name="diverging-small",
        data=dataclasses.replace(base.data, n_train=150, n_reference=150, n_val=150),
        model=dataclasses.replace(base.model, widths=(16,)),
        search=dataclasses.replace(base.search, batch_size=Knob("batch_size", "categorical", choices=(16,))),
        training=dataclasses.replace(base.training, steps=60, record_every=10),
        bound=dataclasses.replace(base.bound, lipschitz_subsample=32),
        sampler=dataclasses.replace(base.sampler, kind="grid", grid_points=3),
        run=dataclasses.replace(base.run, n_trials=3),
        source_file=None,
    )
    summary = run_study(cfg, progress=False)
    assert (summary.trials_run, summary.trials_done) == (3, 3)

    study = load(workspace, cfg.name)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 3 and trials_done(study) == 3  # diverged trials count towards the budget
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert failed and complete and len(failed) + len(complete) == 3
    assert max(t.params["learning_rate"] for t in failed) == pytest.approx(50.0)
    assert min(t.params["learning_rate"] for t in complete) == pytest.approx(0.05)

    client = client_for(workspace)
    parent, by_number = assert_one_run_per_trial(client, study, cfg.experiment_name)
    for t in failed:
        assert t.user_attrs[FAIL_REASON].startswith("diverged at step")
        run = client.get_run(by_number[t.number].info.run_id)
        assert run.info.status == "FAILED"
        assert run.data.tags["hsgd.fail_reason"] == t.user_attrs[FAIL_REASON]
        assert run.data.tags["optuna.state"] == "FAIL"
        assert not any(k.startswith("bound/") for k in run.data.metrics)
    for t in complete:
        assert client.get_run(by_number[t.number].info.run_id).info.status == "FINISHED"
    runs = [client.get_run(r.info.run_id) for r in (parent, *by_number.values())]
    assert_no_nonfinite_metric(client, runs)
    assert parent.data.metrics["study/n_failed"] == len(failed)

    table = trials_table(study)
    assert set(table.loc[table["state"] == "FAIL", "pareto_rank"]) == {0}
    assert (table.loc[table["state"] == "COMPLETE", "pareto_rank"] >= 1).all()
    assert table.loc[table["state"] == "FAIL", "fail_reason"].str.startswith("diverged").all()
    assert set(BOUND_COLUMNS) - {"bound/risk_bound"} <= set(table.columns)


# ---------------------------------------------------------------------------------------------
# A worker that died mid-trial
# ---------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphaned_trial_is_failed_and_rerun(workspace):
    cfg = parse_study(tiny_raw("orphan", 1), workspace)
    run_study(cfg, progress=False)

    # A worker that started trial 1, opened its MLflow run, and died.
    study = load(workspace, cfg.name)
    trial = study.ask()
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": _dead_pid()})
    tracker = Tracker()
    experiment_id = tracker.experiment_id(cfg.experiment_name, create=False)
    parent_id = tracker.parent_run_id(experiment_id, cfg.name)
    run_id = tracker.start_trial(experiment_id, parent_id, cfg.name, trial.number, {"learning_rate": 0.1})
    trial.set_user_attr("mlflow_run_id", run_id)
    client = client_for(workspace)
    assert client.get_run(run_id).info.status == "RUNNING"

    summary = run_study(with_run(cfg, n_trials=3), progress=False)
    assert (summary.trials_run, summary.trials_done) == (2, 3)

    study = load(workspace, cfg.name)
    trials = study.get_trials(deepcopy=False)
    orphan = trials[trial.number]
    assert orphan.state == TrialState.FAIL
    assert FAIL_REASON not in orphan.user_attrs  # died, did not fail by our rule: not counted
    assert len(trials) == 4 and trials_done(study) == 3
    assert [t.number for t in trials if t.state == TrialState.COMPLETE] == [0, 2, 3]

    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["optuna.state"] == "FAIL"
    assert "worker" in run.data.tags["hsgd.fail_reason"]
    parent, by_number = assert_one_run_per_trial(client, study, cfg.experiment_name)
    assert parent.info.status == "FINISHED"
    assert [n for n, r in sorted(by_number.items()) if r.info.status == "FINISHED"] == [0, 2, 3]


# ---------------------------------------------------------------------------------------------
# The command line, once, in a real subprocess
# ---------------------------------------------------------------------------------------------


def test_cli_run_then_rank(workspace):
    study_file = workspace / "cli.toml"
    study_file.write_text(TINY_TOML.format(name="cli", n_trials=2))
    exe = Path(sys.executable).with_name("hsgd-tune")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "hsgd_tune.cli"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"  # as _one_torch_thread does in this process

    run = subprocess.run(
        [*command, "run", str(study_file), "--quiet"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "cli: 2/2 trials finished" in run.stdout
    assert "Traceback" not in run.stderr

    rank = subprocess.run(
        [*command, "rank", str(study_file)],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rank.returncode == 0, rank.stderr
    assert "Pareto front" in rank.stdout
    assert "All trials of cli" in rank.stdout
    # The subprocess wrote to this folder's stores.
    assert len(load(workspace, "cli").trials) == 2
    _, children = runs_of(client_for(workspace), "hsgd-cli")
    assert len(children) == 2
