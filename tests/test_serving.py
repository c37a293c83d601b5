"""The registered champion answers in the data's own terms: a CSV's string labels, a regression
target's units; raw rows are mapped exactly as the study mapped them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from champion import predict_in_fresh_process

from hsgd_tune.advise.pick import load_trial_model
from hsgd_tune.advise.ranking import load_ranking
from hsgd_tune.cli.main import main
from hsgd_tune.data.datasets import split_indices
from hsgd_tune.search.prepare import prepare
from hsgd_tune.search.runner import run_study
from hsgd_tune.studyfile.config import load_study
from hsgd_tune.track.tracker import Tracker

STUDY = """\
name = "{name}"
seed = 0

[data]
source = "csv"
path = "{name}.csv"
target = "{target}"
n_train = 80
n_val = 40

[model]
{model}

[search.learning_rate]
choices = [0.05]

[search.batch_size]
choices = [16]

[training]
steps = 150
record_every = 50

[certificate]
enabled = false

[diagnostics]
trials = "none"

[run]
n_trials = 1
"""


def animals(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Integer features, string labels: what a user's CSV looks like."""
    w, h = rng.integers(0, 100, n), rng.integers(0, 100, n)
    label = np.where(w < 35, "ant", np.where(w + h < 110, "cat", "dog"))
    return pd.DataFrame({"w": w, "h": h, "animal": label})


def prices(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """A regression target far from mean 0 and scale 1: its units must come back."""
    x1, x2 = rng.normal(3.0, 2.0, n), rng.normal(-1.0, 0.5, n)
    return pd.DataFrame({"x1": x1, "x2": x2, "price": 5000 + 800 * x1 - 300 * x2 + rng.normal(0, 20, n)})


@pytest.fixture(scope="module")
def picked(tmp_path_factory, one_torch_thread):
    """Two one-trial CSV studies in one folder (shared stores), each run and picked."""
    folder = tmp_path_factory.mktemp("serving")
    rng = np.random.default_rng(0)
    studies = {
        "animals": ("animal", 'kind = "mlp"\nwidths = [8]', animals(rng, 300)),
        "prices": ("price", 'kind = "linear"\nwidths = []', prices(rng, 300)),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for name, (target, model, frame) in studies.items():
            frame.to_csv(folder / f"{name}.csv", index=False)
            path = folder / f"{name}.toml"
            path.write_text(STUDY.format(name=name, target=target, model=model))
            run_study(load_study(path), progress=False)
            assert main(["pick", str(path), "--out", f"{name}-picked.toml"]) == 0
    return SimpleNamespace(folder=folder, frames={name: s[2] for name, s in studies.items()})


@pytest.fixture(scope="module")
def served(picked):
    """Both champions' answers on their study's raw V rows, from one fresh process (no pickle
    warning on the way)."""
    requests = {}
    for name, frame in picked.frames.items():
        cfg = load_study(picked.folder / f"{name}.toml")
        rows = split_indices(len(frame), cfg.data, cfg.seed)["val"]
        frame.drop(columns=[cfg.data.target]).iloc[rows].to_csv(
            picked.folder / f"{name}-raw.csv", index=False
        )
        requests[f"models:/hsgd-{name}@champion"] = picked.folder / f"{name}-raw.csv"
    answers, warned = predict_in_fresh_process(picked.folder, requests)
    assert "pickle" not in warned.lower()
    return {name: answers[f"models:/hsgd-{name}@champion"] for name in picked.frames}


def served_and_own(picked, served, name: str, monkeypatch):
    """The champion's answers on the raw V rows, the trial model's raw outputs on the V rows as the
    study standardised them, the dataset, and V's true labels or targets."""
    monkeypatch.chdir(picked.folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_study(picked.folder / f"{name}.toml")
    frame = picked.frames[name]
    rows = split_indices(len(frame), cfg.data, cfg.seed)["val"]
    ranking, _ = load_ranking(name)
    model, _ = load_trial_model(Tracker(), ranking.trial(0).user_attrs["mlflow_run_id"])
    data = prepare(cfg)
    with torch.no_grad():
        own = model(torch.as_tensor(data.val.x)).double().numpy()
    return served[name], own, data, frame[cfg.data.target].to_numpy()[rows]


def test_a_csv_study_with_string_labels_predicts_those_strings(picked, served, monkeypatch):
    answer, own, data, truth = served_and_own(picked, served, "animals", monkeypatch)
    assert data.classes == ("ant", "cat", "dog")
    assert answer["prediction"].tolist() == [data.classes[k] for k in own.argmax(axis=1)]
    assert set(answer.columns) == {"prediction", "probability[ant]", "probability[cat]", "probability[dog]"}
    accuracy = np.mean(answer["prediction"].to_numpy() == truth)
    assert accuracy == pytest.approx(
        1 - load_ranking("animals")[0].trial(0).user_attrs["val/error"], abs=1e-6
    )


def test_a_regression_study_predicts_in_the_targets_units(picked, served, monkeypatch):
    answer, own, data, truth = served_and_own(picked, served, "prices", monkeypatch)
    np.testing.assert_allclose(answer["prediction"], own[:, 0] * data.y_scale + data.y_mean, rtol=1e-12)
    # In units of the target (mean about 5000, std about 1600), not standardised ones.
    assert np.mean(np.abs(answer["prediction"] - truth)) < 0.1 * truth.std()


def test_without_the_pac_bayes_certificate_the_version_still_carries_the_held_out_one(picked, monkeypatch):
    monkeypatch.chdir(picked.folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    version = Tracker().client.get_model_version_by_alias("hsgd-prices", "champion")
    assert version.tags["hsgd.certificate"] == "certificate/heldout_error"
    assert "certificate/bound" not in version.tags  # [certificate] enabled = false
    assert "the very weights this version serves" in version.tags["hsgd.certificate.statement"]


def test_the_shipped_preprocessing_maps_raw_rows_exactly_as_the_study_did(picked, monkeypatch):
    monkeypatch.chdir(picked.folder)
    cfg = load_study(Path("animals.toml"))
    data, frame = prepare(cfg), picked.frames["animals"]
    prep = data.preprocessing()
    rows = split_indices(len(frame), cfg.data, cfg.seed)
    for role in ("train", "reference", "val"):
        raw = frame[prep["feature_names"]].to_numpy(dtype=np.float64)[rows[role]]
        mapped = ((raw - np.array(prep["x_mean"])) / np.array(prep["x_scale"])).astype(np.float32)
        np.testing.assert_array_equal(mapped, getattr(data, role).x)


def test_pick_refuses_a_model_whose_data_changed_since_its_trial(picked, monkeypatch, capsys):
    """The preprocessing shipped with a model must be the one it was trained with."""
    monkeypatch.chdir(picked.folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    csv = picked.folder / "animals.csv"
    original = csv.read_text()
    frame = picked.frames["animals"]
    before = len(Tracker().client.search_model_versions("name = 'hsgd-animals'"))
    try:
        frame.assign(h=frame["h"].to_numpy()[::-1]).to_csv(csv, index=False)  # other rows, same names
        assert main(["pick", "animals.toml", "--out", "changed.toml"]) != 0
    finally:
        csv.write_text(original)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "changed since trial 0 was trained" in err
    assert not (picked.folder / "changed.toml").exists()
    assert len(Tracker().client.search_model_versions("name = 'hsgd-animals'")) == before


def test_models_registered_before_the_layout_change_still_find_their_builder():
    """Serving code logged before issue #16 imports the builder from ``hsgd_tune.models``."""
    from hsgd_tune.models import ModelSpec as OldSpec
    from hsgd_tune.models import build_model as old_build
    from hsgd_tune.train.models import ModelSpec, build_model

    assert OldSpec is ModelSpec and old_build is build_model
