"""`hsgd-tune rank`: Pareto ranks, the recommendation rule, output formats, MLflow tags, errors."""

from __future__ import annotations

import io
import json

import numpy as np
import optuna
import pandas as pd
import pytest
from tiny_study import TINY_STUDY, run_tiny_study, write_tiny_study

from hsgd_tune.advise.ranking import load_ranking, recommend
from hsgd_tune.cli.main import main
from hsgd_tune.errors import ConfigError
from hsgd_tune.search.trials import METRIC_ATTRS
from hsgd_tune.studyfile.config import load_study
from hsgd_tune.track.tracker import Tracker


def naive_recommend(within, prefer, tolerance):
    """The rule spelled out with loops: the reference for the vectorised one."""
    ok = [i for i in range(len(within)) if np.isfinite(within[i]) and np.isfinite(prefer[i])]
    if not ok:
        return None
    best = min(within[i] for i in ok)
    close = [i for i in ok if within[i] <= best + tolerance * abs(best)]
    return min(close, key=lambda i: (prefer[i], within[i], i))


@pytest.mark.parametrize("seed", range(20))
def test_recommend_matches_the_rule_spelled_out(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 15))
    within = rng.choice([0.5, 1.0, 1.02, 1.04, 1.2, 2.0, np.nan], size=n)  # ties on purpose
    prefer = rng.choice([1.0, 2.0, 3.0, np.nan], size=n)
    for tolerance in (0.0, 0.03, 0.1, 5.0):
        assert recommend(within, prefer, tolerance) == naive_recommend(within, prefer, tolerance)


def test_recommend_is_none_without_a_finished_trial():
    assert recommend(np.array([np.nan, 1.0]), np.array([1.0, np.nan]), 0.1) is None


def test_zero_tolerance_picks_the_best_within_and_a_huge_one_the_best_prefer():
    within, prefer = np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])
    assert recommend(within, prefer, 0.0) == 0
    assert recommend(within, prefer, 10.0) == 2


# -- [rank] in the study file ------------------------------------------------------------------


def test_rank_table_defaults_and_values(tmp_path):
    cfg = load_study(
        write_tiny_study(tmp_path, TINY_STUDY + '\n[rank]\ntolerance = 0.2\nprefer = "gap_bound"\n')
    )
    assert (cfg.rank.within, cfg.rank.tolerance, cfg.rank.prefer) == ("crossfit_loss", 0.2, "gap_bound")
    # The rule changes no trial's result, so it is not part of the study's identity.
    assert cfg.fingerprint() == load_study(write_tiny_study(tmp_path)).fingerprint()


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("tolerance = -0.1", "rank.tolerance"),
        ('prefer = "bogus"', "rank.prefer"),
        ("colour = 1", "rank.colour"),
    ],
)
def test_bad_rank_table_names_file_and_key(tmp_path, table, key):
    path = write_tiny_study(tmp_path, TINY_STUDY + f"\n[rank]\n{table}\n")
    with pytest.raises(ConfigError, match=rf"tiny.toml: {key}: "):
        load_study(path)


# -- the command on a real (tiny) study ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        yield run_tiny_study(tmp_path_factory.mktemp("rank"), mp)


@pytest.fixture
def in_tiny(tiny, monkeypatch):
    monkeypatch.chdir(tiny.parent)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tiny


def trial_values(study_name="tiny"):
    study = optuna.load_study(study_name=study_name, storage=optuna_storage())
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    return {t.number: {k: t.user_attrs[v] for k, v in METRIC_ATTRS.items()} for t in done}


def optuna_storage():
    from hsgd_tune.search.storage import open_storage

    return open_storage(None)


def test_rank_prints_front_trials_and_the_recommendation(in_tiny, capsys):
    assert main(["rank", str(in_tiny)]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of tiny" in out and "All trials of tiny" in out
    assert "Recommended: trial" in out and "the finished trial with the smallest crossfit_loss" in out
    assert "rests on: crossfit_loss = " in out and "runner-up: trial" in out


@pytest.mark.parametrize("tolerance", [0.0, 100.0])
def test_tolerance_on_the_command_line_moves_the_recommendation(in_tiny, capsys, tolerance):
    assert main(["rank", str(in_tiny), "--format", "json", "--tolerance", str(tolerance), "--no-mlflow"]) == 0
    doc = json.loads(capsys.readouterr().out)
    values = trial_values()
    key = "crossfit_loss" if tolerance == 0 else "risk_bound"  # 0: the best estimate; huge: the best bound
    assert doc["recommended_trial"] == min(values, key=lambda n: values[n][key])
    assert doc["rule"]["tolerance"] == tolerance


def test_csv_and_markdown_carry_the_same_ranking(in_tiny, capsys):
    assert main(["rank", "tiny", "--format", "csv", "--no-mlflow"]) == 0  # by name, not file
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert {"trial", "pareto_rank", "recommended", "crossfit_loss", "risk_bound", "val/loss"} <= set(
        table.columns
    )
    assert table["recommended"].sum() == 1
    assert main(["rank", "tiny", "--format", "markdown", "--no-mlflow"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("**Recommended: trial") and md.count("\n|") == len(table) + 2


def test_out_file_is_written_in_the_format_of_its_suffix(in_tiny, capsys):
    assert main(["rank", str(in_tiny), "--out", "ranking.json", "--no-mlflow"]) == 0
    doc = json.loads((in_tiny.parent / "ranking.json").read_text())
    assert len(doc["trials"]) == 5


def test_ranks_and_recommendation_land_on_the_mlflow_runs(in_tiny):
    assert main(["rank", str(in_tiny)]) == 0
    client = Tracker().client
    experiment = client.get_experiment_by_name("hsgd-tiny").experiment_id
    recommended = client.search_runs([experiment], "tags.`hsgd.recommended` = 'true'")
    assert len(recommended) == 1
    ranked = client.search_runs([experiment], "metrics.`rank/pareto_rank` = 1")
    study = optuna.load_study(study_name="tiny", storage=optuna_storage())
    front = {t.number for t in study.best_trials}
    assert {int(r.data.tags["optuna.trial_number"]) for r in ranked} == front
    parent = client.search_runs([experiment], "tags.`hsgd.role` = 'study'")[0]
    assert parent.data.tags["hsgd.recommended_trial"] == recommended[0].data.tags["optuna.trial_number"]


def test_the_mlflow_runs_carry_the_rule_order_with_the_recommended_trial_first(in_tiny):
    """``rank/order`` is what the UI's ranked view sorts by: 1, 2, … in the order ``rank`` prints."""
    assert main(["rank", str(in_tiny)]) == 0
    client = Tracker().client
    experiment = client.get_experiment_by_name("hsgd-tiny").experiment_id
    runs = client.search_runs(
        [experiment], "tags.`hsgd.role` = 'trial'", order_by=["metrics.`rank/order` ASC"]
    )
    ordered = [r for r in runs if "rank/order" in r.data.metrics]
    ranking, _ = load_ranking("tiny")
    assert [int(r.data.tags["optuna.trial_number"]) for r in ordered] == ranking.order
    assert [r.data.metrics["rank/order"] for r in ordered] == list(range(1, len(ordered) + 1))
    assert ordered[0].data.tags["hsgd.recommended"] == "true"


# -- mistakes: one line, non-zero exit, nothing written ------------------------------------------


def test_unknown_study_is_one_line_and_writes_nothing(in_tiny, capsys):
    assert main(["rank", "nope", "--out", "r.csv"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no study named 'nope'" in err
    assert not (in_tiny.parent / "r.csv").exists()


def test_missing_study_file_is_a_config_error(in_tiny, capsys):
    assert main(["rank", "missing.toml"]) == 2
    assert "study file must exist" in capsys.readouterr().err


def test_bad_out_suffix_is_refused_before_anything_is_written(in_tiny, capsys):
    assert main(["rank", str(in_tiny), "--out", "ranking.xlsx"]) == 2
    assert "--out: must end in one of" in capsys.readouterr().err
    assert not (in_tiny.parent / "ranking.xlsx").exists()


def test_study_without_finished_trials_is_an_error(workdir, capsys):
    storage = optuna_storage()
    study = optuna.create_study(study_name="empty", storage=storage, directions=["minimize", "minimize"])
    study.set_user_attr("config", json.dumps(load_study(write_tiny_study(workdir)).to_dict()))
    assert main(["rank", "empty", "--out", "r.md"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished trials" in err
    assert not (workdir / "r.md").exists()
