"""`hsgd-tune pick` and `train`: the exported config loads back and reproduces its trial; the model
is registered with an alias; mistakes write nothing."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from champion import predict_in_fresh_process
from sklearn.datasets import load_digits
from tiny_study import TINY_STUDY, run_tiny_study, write_tiny_study

from hsgd_tune.advise.pick import load_trial_model
from hsgd_tune.advise.ranking import load_ranking
from hsgd_tune.cli.main import main
from hsgd_tune.data.datasets import split_indices
from hsgd_tune.search.objective import evaluate
from hsgd_tune.search.prepare import prepare
from hsgd_tune.search.storage import open_storage
from hsgd_tune.studyfile.config import load_study
from hsgd_tune.studyfile.export import config_from_dict, dumps_toml, study_file_dict
from hsgd_tune.track.tracker import Tracker

# -- the study-file writer ------------------------------------------------------------------------


def test_toml_writer_round_trips_through_tomllib():
    doc = {
        "name": 'odd "name" \\ ü',
        "seed": 3,
        "flag": False,
        "x": 0.1 + 0.2,  # needs every digit to read back equal
        "tiny": 1e-300,
        "a": {"list": [1, 2.5, "s", True], "empty": [], "b": {"deep": -1}, "inline": [{"k": 1}]},
        "dotted.key": {"v": 1},
    }
    assert tomllib.loads(dumps_toml(doc)) == doc


@pytest.mark.parametrize("study", ["quickstart.toml", "tiny"])
def test_a_config_rebuilt_from_its_dict_is_the_same_config(study, tmp_path):
    path = (
        Path(__file__).resolve().parent.parent / "studies" / study
        if study.endswith(".toml")
        else write_tiny_study(tmp_path)
    )
    cfg = load_study(path)
    again = config_from_dict(cfg.to_dict())
    assert again == dataclasses.replace(cfg, source_file=None)
    assert again.fingerprint() == cfg.fingerprint()


def test_fixed_knobs_become_single_choices(tmp_path):
    cfg = load_study(write_tiny_study(tmp_path))
    doc = study_file_dict(cfg.to_dict(), fixed={"learning_rate": 0.123, "batch_size": 8})
    assert doc["search"] == {"learning_rate": {"choices": [0.123]}, "batch_size": {"choices": [8]}}


# -- pick and train on a real (tiny) study --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        yield run_tiny_study(tmp_path_factory.mktemp("pick"), mp)


@pytest.fixture
def in_tiny(tiny, monkeypatch):
    monkeypatch.chdir(tiny.parent)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tiny


def trials():
    study = optuna.load_study(study_name="tiny", storage=open_storage(None))
    return {t.number: t for t in study.trials}


def test_exported_config_loads_back_and_reproduces_the_trial(in_tiny, capsys):
    trial = min((t for t in trials().values() if t.state.name == "COMPLETE"), key=lambda t: t.number)
    pick = ["pick", str(in_tiny), "--trial", str(trial.number), "--out", "picked.toml"]
    assert main([*pick, "--model-name", "hsgd-tiny-exported"]) == 0
    cfg = load_study(in_tiny.parent / "picked.toml")
    assert cfg.search.learning_rate.choices == (trial.params["learning_rate"],)
    assert cfg.search.batch_size.choices == (trial.params["batch_size"],)
    # δ still divided over the original study's configuration grid, not the single exported one.
    assert cfg.grid_size == load_study(in_tiny).grid_size > 1
    # Common random numbers: the same seed and values give the trial's own training loss.
    outcome = evaluate(cfg, prepare(cfg), trial.params)
    assert outcome.run.final["train/loss"] == pytest.approx(trial.user_attrs["train/loss"], rel=1e-6)
    assert outcome.bound.risk_bound == pytest.approx(trial.user_attrs["bound/risk_bound"], rel=1e-6)
    capsys.readouterr()
    assert main(["train", "picked.toml", "--out", "trained"]) == 0
    out = capsys.readouterr().out
    assert f"train/loss = {trial.user_attrs['train/loss']:.6g}" in out
    assert (in_tiny.parent / "trained" / "model" / "state_dict.pt").is_file()
    # `train` logged a run (params, metrics, model) in the original study's experiment.
    client = Tracker().client
    experiment = client.get_experiment_by_name("hsgd-tiny")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`hsgd.role` = 'train'")
    assert run.info.run_name == "train-tiny-trial-0000".replace("0000", f"{trial.number:04d}")
    assert run.data.params["learning_rate"] == str(trial.params["learning_rate"])
    assert run.data.metrics["train/loss"] == pytest.approx(trial.user_attrs["train/loss"], rel=1e-6)
    assert "MLmodel" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert f"runs:/{run.info.run_id}/model" in out


@pytest.fixture(scope="module")
def champion(tiny):
    """The recommended trial picked once (``hsgd-tiny@champion``), with its run's end time before."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tiny.parent)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ranking, _ = load_ranking(str(tiny))
        trial = ranking.trial(ranking.recommended)
        run_id = trial.user_attrs["mlflow_run_id"]
        ended = Tracker().client.get_run(run_id).info.end_time
        assert main(["pick", str(tiny), "--out", "champion.toml", "--force"]) == 0
        version = Tracker().client.get_model_version_by_alias("hsgd-tiny", "champion")
    return SimpleNamespace(trial=trial, run_id=run_id, ended=ended, version=version)


def test_pick_registers_the_recommended_model_in_a_run_of_its_own(champion, in_tiny):
    client = Tracker().client
    version = champion.version
    assert version.tags["optuna.trial_number"] == str(champion.trial.number)
    assert version.tags["hsgd.trial_run_id"] == champion.run_id
    # The model was logged in a lineage run of its own, a child of the study's run; the trial's
    # finished run was not reopened, so its end time is what the trial left.
    assert version.run_id != champion.run_id
    lineage = client.get_run(version.run_id)
    assert lineage.data.tags["hsgd.role"] == "champion" and lineage.info.status == "FINISHED"
    assert (
        lineage.data.tags["mlflow.parentRunId"]
        == client.get_run(champion.run_id).data.tags["mlflow.parentRunId"]
    )
    assert lineage.data.tags["hsgd.data_fingerprint"] == version.tags["hsgd.data_fingerprint"]
    assert client.get_run(champion.run_id).info.end_time == champion.ended
    # The torch module stays reachable, and computes what the trial's saved model computes.
    mlflow.set_tracking_uri(Tracker().uri)
    served = mlflow.pyfunc.load_model("models:/hsgd-tiny@champion").unwrap_python_model().module
    original, spec = load_trial_model(Tracker(), champion.run_id)
    x = torch.randn(4, spec.n_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_array_equal(served(x).numpy(), original(x).numpy())


def test_the_version_carries_the_trials_certificates_and_their_statement(champion, in_tiny):
    trial_run = Tracker().client.get_run(champion.run_id)
    tags = champion.version.tags
    for key in ("certificate/heldout_error", "certificate/bound"):  # the served weights; Q around them
        assert float(tags[key]) == pytest.approx(trial_run.data.metrics[key], rel=1e-5)
    assert tags["hsgd.certificate"] == "certificate/heldout_error"
    statement = tags["hsgd.certificate.statement"]
    grid = load_ranking(str(in_tiny))[0].study.user_attrs["grid_size"]
    for fact in (  # which model, which data, which δ
        f"trial {champion.trial.number}'s training split S (120 rows)",
        "the very weights this version serves",
        "not about the weights this version serves",  # the PAC-Bayes certificate is about Q
        "digits (1797 rows, 64 features, 10 classes)",
        "1 − 0.05",
        f"grid of {grid} configurations",
    ):
        assert fact in statement
    assert statement in champion.version.description


def test_the_champion_predicts_raw_digits_rows_as_the_trial_did(champion, in_tiny):
    """In a fresh process, through mlflow.pyfunc: raw rows in, digits out, the trial's accuracy."""
    cfg = load_study(in_tiny)
    rows = split_indices(1797, cfg.data, cfg.seed)["val"]
    digits = load_digits(as_frame=True)
    digits.data.iloc[rows].to_csv(in_tiny.parent / "raw_val.csv", index=False)
    answers, warned = predict_in_fresh_process(
        in_tiny.parent, {"models:/hsgd-tiny@champion": in_tiny.parent / "raw_val.csv"}
    )
    served = answers["models:/hsgd-tiny@champion"]
    # The trial's own model on the rows as the study standardised them: the very same predictions.
    model, _ = load_trial_model(Tracker(), champion.run_id)
    with torch.no_grad():
        own = model(torch.as_tensor(prepare(cfg).val.x)).argmax(dim=1).numpy()
    np.testing.assert_array_equal(served["prediction"].to_numpy(), own)
    accuracy = np.mean(served["prediction"].to_numpy() == digits.target.to_numpy()[rows])
    assert accuracy == pytest.approx(1 - champion.trial.user_attrs["val/error"], abs=1e-6)
    probabilities = served[[f"probability[{k}]" for k in range(10)]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert "pickle" not in warned.lower()


def test_the_champion_takes_columns_in_any_order_and_arrays_through_its_python_model(champion, in_tiny):
    mlflow.set_tracking_uri(Tracker().uri)
    model = mlflow.pyfunc.load_model("models:/hsgd-tiny@champion")
    rows = load_digits(as_frame=True).data.head(6)
    expected = model.predict(rows)
    pd.testing.assert_frame_equal(model.predict(rows[rows.columns[::-1]]), expected)
    pd.testing.assert_frame_equal(model.unwrap_python_model().predict(None, rows.to_numpy()), expected)
    assert model.metadata.get_input_schema().input_names() == list(rows.columns)
    with pytest.raises(Exception, match="pixel_0_3"):
        model.predict(rows.assign(pixel_0_3="dark"))


def test_refit_registers_a_new_version_that_the_certificates_do_not_cover(champion, in_tiny, capsys):
    assert main(["pick", str(in_tiny), "--refit", "--alias", "refitted", "--out", "refit.toml"]) == 0
    assert "do not cover" in capsys.readouterr().out
    client = Tracker().client
    version = client.get_model_version_by_alias("hsgd-tiny", "refitted")
    assert int(version.version) > int(champion.version.version)
    assert version.tags["optuna.trial_number"] == str(champion.trial.number)
    assert version.tags["hsgd.trial_run_id"] == champion.run_id
    assert version.tags["hsgd.certificate"] == "none" and "certificate/bound" not in version.tags
    assert "do not cover" in version.tags["hsgd.certificate.statement"]
    assert "do not cover" in version.description
    lineage = client.get_run(version.run_id)
    assert lineage.data.metrics["refit/n_rows"] == 360  # S ∪ H ∪ V: 120 + 120 + 120
    assert lineage.data.tags["hsgd.trial_run_id"] == champion.run_id
    assert client.get_run(champion.run_id).info.end_time == champion.ended
    # The refitted model is another model, served with the same preprocessing.
    mlflow.set_tracking_uri(Tracker().uri)
    refitted = mlflow.pyfunc.load_model("models:/hsgd-tiny@refitted")
    certified = mlflow.pyfunc.load_model(f"models:/hsgd-tiny/{champion.version.version}")
    rows = load_digits(as_frame=True).data.head(50)
    assert not np.allclose(
        refitted.predict(rows)["probability[0]"], certified.predict(rows)["probability[0]"]
    )


def test_the_readme_production_snippet_runs_as_written(champion, in_tiny):
    """README, "Picking a configuration": a fresh shell in the folder that holds mlruns/."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)\n *```", readme, re.S)
    (snippet,) = [textwrap.dedent(b) for b in blocks if "pyfunc.load_model" in b]
    client = Tracker().client
    copied = client.copy_model_version("models:/hsgd-tiny@champion", "hsgd-quickstart")
    client.set_registered_model_alias("hsgd-quickstart", "champion", copied.version)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=in_tiny.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a failsafe: seconds on a quiet machine
    )
    assert done.returncode == 0, done.stderr
    assert "prediction" in done.stdout and "probability[9]" in done.stdout
    assert "pickle" not in done.stderr.lower()
    assert not (in_tiny.parent / "mlflow.db").exists()  # no stray store next to mlruns/


def test_dry_run_changes_nothing(in_tiny, capsys):
    client = Tracker().client
    before = len(client.search_model_versions("name = 'hsgd-tiny'"))
    assert main(["pick", str(in_tiny), "--dry-run", "--out", "dry.toml", "--model-name", "hsgd-tiny"]) == 0
    out = capsys.readouterr().out
    assert "would export dry.toml" in out and "would register" in out
    assert not (in_tiny.parent / "dry.toml").exists()
    assert main(["pick", str(in_tiny), "--dry-run", "--refit", "--out", "dry.toml"]) == 0
    out = capsys.readouterr().out
    assert "retrained on S ∪ H ∪ V" in out and "do not cover" in out
    assert not (in_tiny.parent / "dry.toml").exists()
    assert len(client.search_model_versions("name = 'hsgd-tiny'")) == before


@pytest.mark.parametrize(
    ("args", "message"), [(["--trial", "99"], "has no trial 99"), (["--trial", "-1"], "--trial")]
)
def test_unknown_trial_is_one_line_and_writes_nothing(in_tiny, capsys, args, message):
    assert main(["pick", str(in_tiny), *args, "--out", "bad.toml"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (in_tiny.parent / "bad.toml").exists()


def test_existing_export_is_not_overwritten_without_force(in_tiny, capsys):
    (in_tiny.parent / "keep.toml").write_text("# mine\n")
    assert main(["pick", str(in_tiny), "--out", "keep.toml"]) == 2
    assert "use --force" in capsys.readouterr().err
    assert (in_tiny.parent / "keep.toml").read_text() == "# mine\n"


def test_train_refuses_a_search_range(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_tiny_study(tmp_path, TINY_STUDY)
    assert main(["train", str(path), "--out", "t"]) == 2
    err = capsys.readouterr().err
    assert "tiny.toml: search.learning_rate: must hold one value" in err
    assert not (tmp_path / "t").exists()
