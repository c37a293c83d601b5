"""`hsgd-tune pick` and `train`: the exported config loads back and reproduces its trial; the model
is registered with an alias; mistakes write nothing."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import mlflow.pytorch
import numpy as np
import optuna
import pytest
import torch
from tiny_study import TINY_STUDY, run_tiny_study, write_tiny_study

from hsgd_tune.cli import main
from hsgd_tune.config import load_study
from hsgd_tune.objective import evaluate
from hsgd_tune.pick import load_trial_model
from hsgd_tune.runner import prepare
from hsgd_tune.study import open_storage
from hsgd_tune.studyfile import config_from_dict, dumps_toml, study_file_dict
from hsgd_tune.tracking import Tracker

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
    assert main(["pick", str(in_tiny), "--trial", str(trial.number), "--out", "picked.toml"]) == 0
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


def test_pick_registers_the_recommended_model_under_an_alias(in_tiny, capsys):
    assert main(["rank", str(in_tiny), "--format", "json", "--no-mlflow"]) == 0
    recommended = __import__("json").loads(capsys.readouterr().out)["recommended_trial"]
    assert main(["pick", str(in_tiny), "--out", "champion.toml", "--force"]) == 0
    run_id = trials()[recommended].user_attrs["mlflow_run_id"]
    client = Tracker().client
    version = client.get_model_version_by_alias("hsgd-tiny", "champion")
    assert version.run_id == run_id and version.tags["optuna.trial_number"] == str(recommended)
    # Production loads it by alias; it computes what the trial's saved model computes.
    mlflow.set_tracking_uri(Tracker().uri)
    served = mlflow.pytorch.load_model("models:/hsgd-tiny@champion")
    original, n_features = load_trial_model(Tracker(), run_id)
    x = torch.randn(4, n_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        np.testing.assert_array_equal(served(x).numpy(), original(x).numpy())


def test_dry_run_changes_nothing(in_tiny, capsys):
    client = Tracker().client
    before = len(client.search_model_versions("name = 'hsgd-tiny'"))
    assert main(["pick", str(in_tiny), "--dry-run", "--out", "dry.toml", "--model-name", "hsgd-tiny"]) == 0
    out = capsys.readouterr().out
    assert "would export dry.toml" in out and "would register" in out
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
