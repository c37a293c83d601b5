"""Certificates after the study (hsgd_tune.search.certification): the same numbers as inside the
trial, for the Pareto front by default, on request for other trials, once per trial; through
`run`, `certify` and `pick`, on real Optuna journal files and real MLflow SQLite stores."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from pathlib import Path

import optuna
import pytest
from tiny_study import TINY_STUDY, write_tiny_study

from hsgd_tune.cli.main import main
from hsgd_tune.search.certification import AFTER_STUDY, DIAGNOSTICS_TAG, certify, front_trials
from hsgd_tune.search.runner import run_study
from hsgd_tune.search.storage import open_storage
from hsgd_tune.search.worker import WorkerOptions
from hsgd_tune.studyfile.config import load_study
from hsgd_tune.track.tracker import Tracker

# One objective, so the Pareto front is the best trial and the other four are not on it; a short
# posterior fit and few noise draws keep each certificate well under a second.
STUDY = (
    TINY_STUDY
    + """
[objectives]
minimize = ["val_loss"]

[certificate]
steps = 40
mc_draws = 2

[diagnostics]
noise_draws = 16
trials = "{trials}"
"""
)
MEASURED = ("certificate/", "tail/", "analytic/")


def run_tiny(
    folder: Path, trials: str, progress: bool = False, text: str | None = None
) -> tuple[Path, set[int], str]:
    """Run the study (``text``, default STUDY) in ``folder`` with ``[diagnostics] trials``; its file,
    the trials whose runs hold a certificate right after the run, and what the run printed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        path = write_tiny_study(folder, text or STUDY.format(trials=trials))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_study(load_study(path), progress=progress)
        done = {n for n, run in runs().items() if "certificate/bound" in run.data.metrics}
    return path, done, out.getvalue()


def study() -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=open_storage(None))


def runs() -> dict:
    """Trial number → its MLflow run, in the working directory's stores."""
    client = Tracker().client
    return {t.number: client.get_run(t.user_attrs["mlflow_run_id"]) for t in study().trials}


def sampled(run) -> dict[str, str]:
    return {k: v for k, v in run.data.params.items() if not k.startswith("config.")}


def history(run, key: str = "certificate/bound") -> list:
    return Tracker().client.get_metric_history(run.info.run_id, key)


@pytest.fixture(scope="module")
def every(tmp_path_factory, one_torch_thread):
    """The study with a certificate inside every trial."""
    return run_tiny(tmp_path_factory.mktemp("all"), "all")


@pytest.fixture(scope="module")
def front(tmp_path_factory, one_torch_thread):
    """The same study (same seed, same sampled values) with the default: the front after the study."""
    return run_tiny(tmp_path_factory.mktemp("front"), "front", progress=True)


@pytest.fixture(scope="module")
def none(tmp_path_factory, one_torch_thread):
    """The same study again, certified only on request."""
    return run_tiny(tmp_path_factory.mktemp("none"), "none")


def enter(monkeypatch, path: Path) -> Path:
    """Work in the study's folder with its default stores (``pick`` sets MLFLOW_TRACKING_URI)."""
    monkeypatch.chdir(path.parent)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return path


@pytest.fixture
def in_none(none, monkeypatch):
    return enter(monkeypatch, none[0])


def off_front() -> list[int]:
    """The finished trials not on the Pareto front (four of five here)."""
    return sorted(set(range(len(study().trials))) - set(front_trials(study())))


def test_after_the_study_gives_the_certificate_the_trial_would_have_logged(every, front, monkeypatch):
    enter(monkeypatch, every[0])
    inside = runs()
    enter(monkeypatch, front[0])
    # The rest of the trials too, through the API: five comparisons instead of one.
    certify(study(), load_study(front[0]), Tracker(), range(len(study().trials)))
    after = runs()
    assert len(after) == len(inside) == 5
    for number, run in after.items():
        # The same seed samples the same values: the same trial, in two studies.
        assert sampled(run) == sampled(inside[number]) and len(sampled(run)) == 2
        measured = {k: v for k, v in run.data.metrics.items() if k.startswith(MEASURED)}
        expected = {k: v for k, v in inside[number].data.metrics.items() if k.startswith(MEASURED)}
        assert "certificate/bound" in measured and "tail/alpha" in measured
        assert "certificate/perturbed_bound" in measured and "certificate/perturbed_bound_max" in measured
        assert measured == expected  # exactly: same float32 weights, same seeds
        assert run.data.tags[DIAGNOSTICS_TAG] == AFTER_STUDY
        assert DIAGNOSTICS_TAG not in inside[number].data.tags


def test_by_default_exactly_the_front_is_certified_after_the_run(front, monkeypatch):
    path, done, printed = front
    enter(monkeypatch, path)
    (best,) = front_trials(study())
    assert best == min(study().trials, key=lambda t: t.values[0]).number
    assert done == {best}
    assert f"certificate for trial {best}: " in printed


def test_with_trials_none_nothing_is_certified(none):
    assert none[1] == set()


def test_certify_adds_a_trial_once(in_none, capsys):
    number = off_front()[0]
    assert "certificate/bound" not in runs()[number].data.metrics
    assert main(["certify", str(in_none), "--trials", str(number)]) == 0
    out = capsys.readouterr().out
    assert f"certificate for trial {number}: " in out and "now" in out
    assert main(["certify", "tiny", "--trials", str(number)]) == 0  # by name, the second time
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:1] == [str(number)])
    # found, not computed: no duration that would read as this command's, and says so
    assert row.split()[4] == "-" and row.endswith("earlier (after the study)")
    assert "vacuous: the certificate is at least min(trivial, 0.5)" in out
    run = runs()[number]
    assert len(history(run)) == 1 and len(history(run, "tail/alpha")) == 1
    assert run.data.metrics["certificate/trivial"] == pytest.approx(0.9)


def test_certify_reads_the_trajectory_bound_the_trial_logged(in_none, monkeypatch):
    """Not recomputed (L_pop's passes over V were a fifth of a certificate's cost), and what
    depends on it is what a recomputed bound gives."""
    from hsgd_tune.search import certification

    def recompute(*args):
        raise AssertionError("the trial's logged bound should have been used")

    cfg = load_study(in_none)
    data = certification.prepare(cfg)
    trial = study().trials[off_front()[1]]
    run = runs()[trial.number]
    with monkeypatch.context() as patched:  # as a run logged without the bound would be: recomputed
        patched.setattr(certification.TrajectoryBound, "from_metrics", classmethod(lambda *a: None))
        computed = certification._compute(cfg, data, Tracker(), trial, run.data.metrics)  # logs nothing
    monkeypatch.setattr(certification, "trial_bound", recompute)
    read_back = certification._compute(cfg, data, Tracker(), trial, run.data.metrics)
    measured = [
        {k: v for k, v in result[2].items() if k.startswith(MEASURED)} for result in (computed, read_back)
    ]
    assert "certificate/bound" in measured[1] and measured[0] == measured[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trials", "99"], "has no trial 99"),
        (["--trials", "2,x"], "--trials: must be trial numbers"),
        (["--trials", "1", "--all"], None),  # argparse: not allowed together
    ],
)
def test_a_bad_trial_is_one_line_without_a_traceback(in_none, capsys, args, message):
    with contextlib.suppress(SystemExit):
        assert main(["certify", str(in_none), *args]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if message is not None:
        assert err.count("\n") == 1 and message in err
    else:
        assert "not allowed with argument" in err


def test_a_trial_without_artifacts_is_one_line(in_none, capsys):
    number = off_front()[-1]
    run = runs()[number]
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    (artifacts / "trajectories.npz").unlink()
    assert main(["certify", str(in_none), "--trials", str(number)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no trajectories.npz" in err
    assert "certificate/bound" not in runs()[number].data.metrics


def test_pick_certifies_the_picked_trial(in_none, capsys):
    dry, picked = off_front()[1:3]
    assert main(["pick", str(in_none), "--trial", str(dry), "--dry-run"]) == 0
    assert f"would certify trial {dry} first" in capsys.readouterr().out
    assert "certificate/bound" not in runs()[dry].data.metrics  # a dry run changes nothing
    assert main(["pick", str(in_none), "--trial", str(picked), "--out", "picked.toml"]) == 0
    out = capsys.readouterr().out
    assert f"certificate for trial {picked}: " in out and "computed now" in out
    assert len(history(runs()[picked])) == 1
    version = Tracker().client.get_model_version_by_alias("hsgd-tiny", "champion")
    assert version.tags["optuna.trial_number"] == str(picked)  # the model went to the registry
    # ... with the certificate computed just now (not the state of its run before pick began).
    certificate = runs()[picked].data.metrics["certificate/bound"]
    assert float(version.tags["certificate/bound"]) == pytest.approx(certificate, rel=1e-5)


def test_a_finished_study_run_again_certifies_its_front(in_none, capsys):
    (in_none.parent / "again").mkdir()
    cfg = load_study(write_tiny_study(in_none.parent / "again", STUDY.format(trials="front")))
    (best,) = front_trials(study())
    stopping = WorkerOptions(stop=threading.Event())
    stopping.stop.set()
    run_study(cfg, progress=False, worker=stopping)  # a worker told to stop leaves it to the next run
    assert "certificate/bound" not in runs()[best].data.metrics
    summary = run_study(cfg, progress=False)  # 0 trials left; the front still gets its certificate
    assert summary.trials_run == 0
    assert len(history(runs()[best])) == 1


def test_a_sketched_trial_is_reported_as_not_certifiable(workdir, one_torch_thread):
    text = STUDY.format(trials="front").replace("record_every = 20", "record_every = 20\nsketch_above = 100")
    path, done, printed = run_tiny(
        workdir, "front", progress=True, text=text.replace("n_trials = 5", "n_trials = 2")
    )
    (best,) = front_trials(study())
    assert done == set()
    assert f"certificate for trial {best}: skipped: trajectories are sketched" in printed
    assert runs()[best].data.tags[DIAGNOSTICS_TAG].startswith("skipped")


def test_rank_shows_the_certificates_computed_after_the_study(in_none, capsys):
    number = off_front()[0]
    assert main(["certify", str(in_none), "--trials", str(number)]) == 0
    capsys.readouterr()
    assert main(["rank", str(in_none), "--format", "json"]) == 0
    rows = {row["trial"]: row["certificate"] for row in json.loads(capsys.readouterr().out)["trials"]}
    logged = {n: run.data.metrics.get("certificate/bound") for n, run in runs().items()}
    assert rows.keys() == logged.keys() and logged[number] is not None
    for n, value in logged.items():  # the value MLflow holds, or none for a trial without one
        assert rows[n] == (pytest.approx(value, rel=1e-9) if value is not None else None)
    assert main(["rank", str(in_none), "--no-mlflow"]) == 0  # without MLflow, no such column
    assert "certificate" not in capsys.readouterr().out


# -- the default after a study: the recommended trial and the runner-up ------------------------

TWO_OBJECTIVES = STUDY.replace('minimize = ["val_loss"]', 'minimize = ["val_loss", "risk_bound"]')


@pytest.fixture(scope="module")
def recommended(tmp_path_factory, one_torch_thread):
    """Two objectives, the default [diagnostics] trials (the line is left out of the file)."""
    text = TWO_OBJECTIVES.format(trials="x").replace('trials = "x"\n', "")
    return run_tiny(tmp_path_factory.mktemp("recommended"), "", progress=True, text=text)


def test_by_default_the_recommended_trial_and_the_runner_up_are_certified(recommended, monkeypatch):
    from hsgd_tune.advise.ranking import rank_study

    path, done, printed = recommended
    enter(monkeypatch, path)
    cfg = load_study(path)
    assert cfg.diagnostics.trials == "recommended"
    order = rank_study(study(), cfg.rank).order
    assert done == set(order[:2]) and len(done) == 2
    header = "certifying the recommended trial and the runner-up after the study ([diagnostics] trials"
    assert f'{header} = "recommended")' in printed
    assert all(f"certificate for trial {n}: " in printed for n in order[:2])


def expected_note(certified: list[int], study_ref: str) -> str:
    missing = [n for n in front_trials(study()) if n not in certified]
    text = "Certified (certificate/bound): trials " + ", ".join(map(str, sorted(certified)))
    if missing:
        text += (
            f"; not certified: {'trial' if len(missing) == 1 else 'trials'} {', '.join(map(str, missing))} "
            f"of the Pareto front (`hsgd-tune certify {study_ref}` certifies the front, `--all` every "
            "finished trial)"
        )
    return text + "."


def test_every_output_says_which_trials_are_certified_and_how_to_certify_the_rest(
    recommended, monkeypatch, capsys
):
    path, done, printed = recommended
    enter(monkeypatch, path)
    certified = sorted(done)
    assert main(["run", str(path), "--quiet"]) == 0  # nothing left to run: its end-of-run summary
    out = capsys.readouterr().out.splitlines()
    assert expected_note(certified, str(path)) in out
    header = out[out.index(next(line for line in out if line.startswith("Pareto front ("))) + 1]
    if set(front_trials(study())) & set(certified):  # a column, "-" on the front trials without one
        assert header.split()[-1] == "certificate"
    assert main(["rank", str(path)]) == 0
    assert expected_note(certified, "tiny") in capsys.readouterr().out.splitlines()
    assert main(["rank", str(path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["certified_trials"] == certified
    assert main(["report", str(path), "--out", "rep"]) == 0
    page = next(Path("rep").glob("*.html")).read_text()
    assert expected_note(certified, "tiny") in page  # html.escape leaves the note as it is


def test_the_certified_note_names_the_front_trials_left_and_the_command():
    import pandas as pd

    from hsgd_tune.advise.ranking import certified_note

    table = pd.DataFrame(
        {"trial": [0, 1, 2, 3, 4], "state": ["COMPLETE"] * 4 + ["FAIL"], "pareto_rank": [1, 1, 1, 2, 1]}
    )
    assert certified_note(table, [], "s.toml") is None  # none yet: the recommendation's line says so
    assert certified_note(table, [1, 0], "s.toml") == (
        "Certified (certificate/bound): trials 0, 1; not certified: trial 2 of the Pareto front "
        "(`hsgd-tune certify s.toml` certifies the front, `--all` every finished trial)."
    )
    assert certified_note(table, [0, 1, 2], "s.toml") == "Certified (certificate/bound): trials 0, 1, 2."
    assert certified_note(table, [0, 1, 2, 3], "s") == "Certified (certificate/bound): every finished trial."
