"""Against real servers: a `mlflow server` on 127.0.0.1 with a temporary SQLite store sees the ranks
and the registered champion through its REST API; `hsgd-tune ui` starts, answers and stops."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import requests
from tiny_study import write_tiny_study

from hsgd_tune.advise.ranking import rank_study
from hsgd_tune.advise.ui import stop, wait_until_up
from hsgd_tune.cli.main import main
from hsgd_tune.search.runner import run_study
from hsgd_tune.search.storage import open_storage
from hsgd_tune.studyfile.config import load_study
from hsgd_tune.track.tracker import Tracker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """A real ``mlflow server`` on a free port, its runs in ``folder/server.db``; yields its URL."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination", str(folder / "server-artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}/health", "mlflow server")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture
def server(tmp_path):
    with mlflow_server(tmp_path) as url:
        yield url


def test_ranks_and_champion_are_visible_through_the_rest_api(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    path = write_tiny_study(tmp_path)
    run_study(load_study(path), progress=False)
    assert main(["rank", str(path)]) == 0
    assert main(["pick", str(path), "--out", "champion.toml"]) == 0

    api = f"{server}/api/2.0/mlflow"
    experiment = requests.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": "hsgd-tiny"}, timeout=30
    )
    experiment_id = experiment.json()["experiment"]["experiment_id"]
    found = requests.post(
        f"{api}/runs/search",
        json={"experiment_ids": [experiment_id], "filter": "tags.`hsgd.role` = 'trial'"},
        timeout=30,
    ).json()["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"]["tags"]} for r in found}
    study = optuna.load_study(study_name="tiny", storage=open_storage(None))
    assert len(tags) == len(study.trials) == 5
    front = {t.number for t in study.best_trials}
    for trial in study.trials:
        rank = tags[trial.user_attrs["mlflow_run_id"]]["hsgd.pareto_rank"]
        assert (rank == "1") == (trial.number in front), (trial.number, rank)
    recommended = [run_id for run_id, t in tags.items() if t["hsgd.recommended"] == "true"]
    assert len(recommended) == 1
    # The recommended trial and the runner-up (the default) were certified after the study from
    # artifacts downloaded through the server.
    best_two = set(rank_study(study, load_study(path).rank).order[:2])
    metrics = {r["info"]["run_id"]: {m["key"] for m in r["data"].get("metrics", [])} for r in found}
    for trial in study.trials:
        certified = "certificate/bound" in metrics[trial.user_attrs["mlflow_run_id"]]
        assert certified == (trial.number in best_two)

    alias = requests.get(
        f"{api}/registered-models/alias", params={"name": "hsgd-tiny", "alias": "champion"}, timeout=30
    )
    assert alias.status_code == 200, alias.text
    # The version was logged in a lineage run of its own, which names the trial's run.
    version_tags = {t["key"]: t["value"] for t in alias.json()["model_version"]["tags"]}
    assert version_tags["hsgd.trial_run_id"] == recommended[0]


def test_ui_serves_the_study_on_localhost_and_stops_on_ctrl_c(workdir):
    optuna.create_study(study_name="tiny", storage=open_storage(None), directions=["minimize"])
    Tracker().experiment_id("hsgd-tiny")
    path = write_tiny_study(workdir)
    port, dashboard_port = free_port(), free_port()  # optuna-dashboard too, when installed
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsgd_tune.cli", "ui", str(path), "--port", str(port)]
        + ["--dashboard-port", str(dashboard_port)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"MLflow UI: http://127.0.0.1:{port}/#/experiments/"), line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            assert answer.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0  # generous: a loaded 2-core machine is slow to stop uvicorn
        with pytest.raises(OSError):  # the server went down with it
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if proc.poll() is None:  # SIGTERM, not SIGKILL: `ui` then stops the server it started
            proc.terminate()
            proc.wait(timeout=120)
