"""`hsgd-tune report` on the studies users actually run first: tiny ones, degenerate search spaces and
diverging runs. Every study here is a few seconds; they share one folder (one MLflow database)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from tiny_study import TINY_STUDY

from hsgd_tune.advise.ranking import load_ranking
from hsgd_tune.advise.report_page import DOMINATED, FRONT, pareto_figure
from hsgd_tune.cli.main import main

#: Study name → what replaces the tiny study's search space and budget.
EDGE_STUDIES = {
    "one": {"n_trials": 1},
    "two": {"n_trials": 2},
    "three": {"n_trials": 3},
    "four": {"n_trials": 4},
    "many": {"n_trials": 8},
    "one_batch": {"n_trials": 3, "batch": "choices = [16]"},
    "one_lr": {"n_trials": 3, "lr": "choices = [0.05]"},
    # lr 200 diverges at the first recorded step; the grid walks 0.05 first, then 200, 200...
    "some_diverged": {"n_trials": 3, "lr": "choices = [0.05, 200.0]", "batch": "choices = [16]"},
    "all_diverged": {"n_trials": 2, "lr": "choices = [200.0]"},
}


DEFAULT_LR, DEFAULT_BATCH = "low = 0.01\nhigh = 0.3", "choices = [8, 32]"


def edge_study(name: str, n_trials: int, lr: str = DEFAULT_LR, batch: str = DEFAULT_BATCH) -> str:
    text = TINY_STUDY.replace('name = "tiny"', f'name = "{name}"')
    text = text.replace(DEFAULT_LR, lr).replace(DEFAULT_BATCH, batch)
    text = text.replace("n_trials = 5", f"n_trials = {n_trials}")
    if name == "some_diverged":
        text = text.replace('kind = "random"', 'kind = "grid"')
    return text


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """Every edge study run once, in one folder; yields the folder."""
    import torch

    from hsgd_tune.search.runner import run_study
    from hsgd_tune.studyfile.config import load_study

    folder = tmp_path_factory.mktemp("edge")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for name, spec in EDGE_STUDIES.items():
            path = folder / f"{name}.toml"
            path.write_text(edge_study(name, **spec))
            run_study(load_study(path), progress=False)
        yield folder
    torch.set_num_threads(threads)


@pytest.fixture
def in_studies(studies, monkeypatch):
    monkeypatch.chdir(studies)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return studies


@pytest.mark.parametrize("name", [n for n in EDGE_STUDIES if n != "all_diverged"])
def test_report_of_any_study_with_a_finished_trial_is_written(in_studies, name, capsys):
    assert main(["report", f"{name}.toml", "--out", f"rep-{name}"]) == 0, capsys.readouterr().err
    folder = in_studies / f"rep-{name}"
    page = (folder / "index.html").read_text()
    assert "Recommended: trial" in page
    for png in ("pareto.png", "decomposition.png", "trajectories.png", "learning_curves.png"):
        assert (folder / png).read_bytes().startswith(b"\x89PNG"), png
    # Interactive and self-contained: plotly.js inlined, nothing fetched from the network.
    assert "Plotly.newPlot" in page and "<script src=" not in page
    # Every finished trial links to its MLflow run.
    ranking, _ = load_ranking(f"{name}.toml")
    for t in ranking.study.get_trials(states=(TrialState.COMPLETE,)):
        assert f"/runs/{t.user_attrs['mlflow_run_id']}" in page


def test_views_that_need_two_varied_parameters_say_why_they_are_missing(in_studies):
    assert main(["report", "one_lr.toml", "--out", "rep-why", "--no-mlflow"]) == 0
    page = (in_studies / "rep-why" / "index.html").read_text()
    assert "not drawn (needs two parameters that vary; varied: batch_size)" in page


def test_the_diverging_study_really_has_a_failed_trial(in_studies):
    ranking, _ = load_ranking("some_diverged.toml")
    states = [t.state for t in ranking.study.trials]
    assert TrialState.FAIL in states and TrialState.COMPLETE in states


def test_report_of_a_study_whose_trials_all_diverged_says_so_in_one_line(in_studies, capsys):
    assert main(["report", "all_diverged.toml", "--out", "rep-all_diverged"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished trials" in err
    assert not (in_studies / "rep-all_diverged").exists()


# -- what `run` prints at the end (the same studies, resumed: no trial left to run) ------------


def test_end_of_run_summary_is_compact_and_ends_with_the_next_commands(in_studies, capsys):
    assert main(["run", "many.toml", "--quiet"]) == 0
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    assert out[0] == "many: 8/8 trials finished (0 this run)."
    front_at = out.index(next(line for line in out if line.startswith("Pareto front (")))
    header = out[front_at + 1].split()
    assert header[:2] == ["trial", "learning_rate"] and "certificate" in header
    assert "bound/complexity" not in header  # the same for every trial: left out
    rows = out[front_at + 2 : out.index("", front_at)]
    starred = [row for row in rows if row.startswith("★")]
    ranking, _ = load_ranking("many.toml")
    assert len(starred) == 1 and starred[0].split()[1] == str(ranking.recommended)
    first = ranking.study.user_attrs["objectives"][0]
    values = [float(row.lstrip("★").split()[header.index(first)]) for row in rows]
    assert values == sorted(values)  # the front, in the ranking's order (by the first objective)
    assert max(len(row) for row in rows) < 100  # was 169 characters a row
    next_at = out.index("Next:")
    assert any(line.startswith("Recommended: trial") for line in out[:next_at])
    commands = [line.split("#")[0].strip() for line in out[next_at + 1 :]]
    assert commands[-3:] == [
        "hsgd-tune rank many.toml",
        "hsgd-tune report many.toml",
        "hsgd-tune ui many.toml",
    ]
    assert commands[0].startswith(". ") and commands[0].endswith("/bin/activate")  # tests run in a venv
    assert "viewStateShareKey=" in out[-1]


def test_end_of_run_summary_counts_failed_trials(in_studies, capsys):
    assert main(["run", "some_diverged.toml", "--quiet"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("some_diverged: 3/3 trials finished (0 this run), ") and first.endswith(
        " failed."
    )


def test_training_reports_its_recorded_steps_to_a_listener(in_studies):
    from hsgd_tune.progress import listening
    from hsgd_tune.search.objective import train_settings
    from hsgd_tune.search.prepare import prepare
    from hsgd_tune.studyfile.config import load_study
    from hsgd_tune.train.models import model_spec
    from hsgd_tune.train.twin import train_twin

    cfg = load_study("one.toml")  # 60 steps, recorded every 20
    data = prepare(cfg)
    spec = model_spec(cfg.model, data.n_features, data.n_outputs, {})
    seen = []
    with listening(lambda step, total: seen.append((step, total))):
        train_twin(data, spec, train_settings(cfg, {"learning_rate": 0.05, "batch_size": 8}))
    assert seen == [(20, 60), (40, 60), (60, 60)]


@pytest.mark.parametrize("values", [[(1, 2), (2, 1), (3, 3)], [(1, 2), (2, 1), (1.5, 1.5), (3, 3), (4, 2.5)]])
def test_the_pareto_view_colours_front_and_other_trials_without_colour_bars(values):
    """Optuna colours by trial number on two colour bars; one trial off the front drew a −0.4 … 0.4 bar."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    for pair in values:
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        study.tell(trial, list(pair))
    fig, why = pareto_figure(study, ["a", "b"], recommended=None, band=None)
    assert why == ""
    groups = {t.name: t for t in fig.data if t.name in ("Pareto front", "other trials")}
    assert groups["Pareto front"].marker.color == FRONT and groups["other trials"].marker.color == DOMINATED
    assert len(groups["Pareto front"].x) == len(values) - len(groups["other trials"].x)
    assert not any(t.marker.showscale for t in fig.data if hasattr(t, "marker"))
