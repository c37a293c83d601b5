"""``report --out``: never delete what the tool did not write (the refusals are in tests/hostile)."""

from __future__ import annotations

import json

import pytest
from tiny_study import TINY_STUDY, write_tiny_study

from hsgd_tune.advise.report import REPORT_MARKER
from hsgd_tune.cli.main import main

FAST = TINY_STUDY.replace("steps = 60", "steps = 20").replace("n_trials = 5", "n_trials = 2")
FAST += '\n[diagnostics]\ntrials = "none"\n'


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report-safety")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        write_tiny_study(folder, FAST)
        assert main(["run", "tiny.toml", "--quiet"]) == 0
    return folder


def test_a_report_replaces_an_earlier_report_whole(study_dir, monkeypatch, capsys):
    monkeypatch.chdir(study_dir)
    assert main(["report", "tiny.toml", "--out", "rep", "--no-mlflow"]) == 0
    (study_dir / "rep" / "stale.png").write_bytes(b"")  # as if an older version had drawn it
    marker = study_dir / "rep" / REPORT_MARKER
    marker.write_text(json.dumps({"files": [*json.loads(marker.read_text())["files"], "stale.png"]}))
    assert main(["report", "tiny.toml", "--out", "rep", "--no-mlflow"]) == 0
    files = {p.name for p in (study_dir / "rep").iterdir()}
    assert "index.html" in files and "stale.png" not in files  # ours, listed: replaced
    assert not [p for p in study_dir.iterdir() if p.name.startswith(".rep-")]  # no staging left


def test_force_writes_beside_the_users_files_and_deletes_nothing(study_dir, monkeypatch, capsys):
    monkeypatch.chdir(study_dir)
    mine = study_dir / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("my thesis")
    assert main(["report", "tiny.toml", "--out", "thesis", "--no-mlflow"]) == 2  # refused
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    assert main(["report", "tiny.toml", "--out", "thesis", "--no-mlflow", "--force"]) == 0
    assert (mine / "thesis.tex").read_text() == "my thesis"
    assert (mine / "index.html").is_file() and not (mine / REPORT_MARKER).exists()
