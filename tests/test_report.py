"""`hsgd-tune report`: the pure helpers against naive references, and the report of a real study."""

from __future__ import annotations

import re

import numpy as np
import pytest
from tiny_study import TINY_STUDY, run_tiny_study, write_tiny_study

from hsgd_tune.advise.correlation import kendall_tau
from hsgd_tune.advise.ranking import load_ranking
from hsgd_tune.advise.report import correlations, log_bins, pca_2d, trial_metrics
from hsgd_tune.cli.main import main
from hsgd_tune.track.tracker import Tracker


def test_few_distinct_values_are_kept_as_they_are():
    values = np.array([0.1, 0.01, 0.1, 0.001])
    assert np.array_equal(log_bins(values, max_bins=3), values)


def test_log_bins_match_a_loop_over_log_scale_edges():
    rng = np.random.default_rng(0)
    values = 10 ** rng.uniform(-3, 0, size=50)
    binned = log_bins(values, max_bins=4)
    lo, hi = np.log10(values.min()), np.log10(values.max())
    width = (hi - lo) / 4
    for v, b in zip(values, binned, strict=True):
        k = min(int((np.log10(v) - lo) / width), 3)  # the last edge belongs to the last bin
        assert b == pytest.approx(10 ** (lo + (k + 0.5) * width))


def test_pca_matches_the_eigenvectors_of_the_covariance():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(40, 5)) @ np.diag([5.0, 2.0, 1.0, 0.5, 0.1])
    projected, explained = pca_2d(points)
    centred = points - points.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(np.cov(centred.T))
    top = eigvec[:, ::-1][:, :2]
    reference = centred @ top
    for k in range(2):  # each axis is defined up to its sign
        sign = np.sign(reference[:, k] @ projected[:, k])
        np.testing.assert_allclose(projected[:, k], sign * reference[:, k], atol=1e-9)
    np.testing.assert_allclose(explained, eigval[::-1][:2] / eigval.sum())


def test_pca_of_points_on_a_line_explains_everything_with_one_axis():
    t = np.linspace(0, 1, 10)[:, None]
    projected, explained = pca_2d(t * np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(explained, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(np.abs(projected[:, 0]), np.abs(t[:, 0] - 0.5) * np.sqrt(14))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = run_tiny_study(tmp_path_factory.mktemp("report"), mp)
        yield path


@pytest.fixture
def in_tiny(tiny, monkeypatch):
    monkeypatch.chdir(tiny.parent)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tiny


def test_report_writes_every_plot_and_logs_them_to_the_parent_run(in_tiny, capsys):
    assert main(["report", str(in_tiny)]) == 0
    folder = in_tiny.parent / "mlruns" / "reports" / "tiny"
    expected = {
        "pareto.png",
        "heatmap_val_loss.png",
        "heatmap_risk_bound.png",
        "heatmap_decoupling_distance.png",
        "decomposition.png",
        "trajectories.png",
        "learning_curves.png",
    }
    assert expected <= {p.name for p in folder.iterdir()}
    for name in expected:
        assert (folder / name).read_bytes().startswith(b"\x89PNG")
    page = (folder / "index.html").read_text()
    assert all(f'src="{name}"' in page for name in expected)
    client = Tracker().client
    experiment = client.get_experiment_by_name("hsgd-tiny").experiment_id
    parent = client.search_runs([experiment], "tags.`hsgd.role` = 'study'")[0]
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{name}" for name in expected | {"index.html"}} <= logged


def test_report_states_kendall_tau_and_psi_of_the_bound_against_the_gap(in_tiny):
    assert main(["report", str(in_tiny), "--out", "rep", "--no-mlflow"]) == 0
    page = (in_tiny.parent / "rep" / "index.html").read_text()
    ranking, _ = load_ranking(str(in_tiny))
    metrics = trial_metrics(ranking)
    gap = metrics["val/loss"] - metrics["train/loss"]
    tau = kendall_tau(metrics["bound/risk_bound"], gap)
    psi = correlations(metrics).set_index("measure").loc["bound/risk_bound", "Psi"]
    stated = re.search(r"Kendall's τ = (-?[\d.]+) and granulated Kendall Ψ = (-?[\d.]+|nan)", page)
    assert stated is not None
    assert float(stated.group(1)) == pytest.approx(tau, abs=5e-4)
    assert stated.group(2) == f"{psi:.3f}"


def test_report_of_unknown_study_writes_nothing(in_tiny, capsys):
    assert main(["report", "nope", "--out", "nothing"]) == 1
    assert "no study named 'nope'" in capsys.readouterr().err
    assert not (in_tiny.parent / "nothing").exists()


def test_tail_index_heatmap_when_every_trial_measures_it(tmp_path, monkeypatch, one_torch_thread):
    from hsgd_tune.search.runner import run_study
    from hsgd_tune.studyfile.config import load_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = TINY_STUDY.replace(
        "[sampler]", '[certificate]\nenabled = false\n[diagnostics]\ntrials = "all"\n[sampler]'
    )
    path = write_tiny_study(tmp_path, text)
    run_study(load_study(path), progress=False)
    ranking, _ = load_ranking(str(path))
    alphas = [t.user_attrs["tail/alpha"] for t in ranking.study.trials]
    assert len(alphas) == 5 and all(0 < a <= 2 for a in alphas)
    assert main(["report", str(path), "--out", "rep", "--no-mlflow"]) == 0
    assert (tmp_path / "rep" / "heatmap_tail_index.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("n_selected", [1, 2, 3, 4])
def test_trajectory_plot_takes_any_number_of_selected_trials(tmp_path, n_selected):
    """3 selected trials on a 2 × 2 grid crashed the report (zip of 4 axes with 3 trials)."""
    from hsgd_tune.advise.report import StudyRecords, plot_trajectories

    rng = np.random.default_rng(0)
    arrays = {
        n: {"empirical": rng.normal(size=(5, 7)), "reference": rng.normal(size=(5, 7))}
        for n in range(n_selected)
    }
    selected = {n: f"reason {n}" for n in range(n_selected)}
    records = StudyRecords(metrics=None, curves={}, trajectories=arrays, selected=selected)
    plot_trajectories(records, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes().startswith(b"\x89PNG")
