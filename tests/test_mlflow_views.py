"""What a user sees in MLflow and optuna-dashboard: the experiment opens on its runs, the printed links
open the trials ranked (checked against a real `mlflow server`), only the params that apply are logged,
and `hsgd-tune ui` serves the study in optuna-dashboard when it is installed."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
from test_mlflow_server import free_port, mlflow_server
from tiny_study import TINY_STUDY, write_tiny_study

from hsgd_tune.search.objective import config_params
from hsgd_tune.studyfile.config import load_study
from hsgd_tune.track.tracker import EXPERIMENT_KIND, Tracker
from hsgd_tune.track.views import COLUMNS, SHARED_VIEW_TAG, study_views, view_state

# -- params -----------------------------------------------------------------------------------


def test_a_digits_study_logs_no_synthetic_data_params(tmp_path):
    params = config_params(load_study(write_tiny_study(tmp_path)))
    assert params["data.source"] == "digits"
    assert not [k for k in params if k.startswith("data.synthetic.")]
    # batch size is categorical: its choices apply, a range does not
    assert "search.batch_size.choices" in params and "search.batch_size.low" not in params
    assert "sampler.grid_points" not in params  # a random sampler has no grid
    assert None not in params.values()


def test_a_synthetic_study_logs_its_synthetic_data_params(tmp_path):
    text = TINY_STUDY.replace('source = "digits"', 'source = "synthetic"')
    params = config_params(load_study(write_tiny_study(tmp_path, text)))
    assert params["data.synthetic.kind"] == "teacher"


# -- the experiment and its views -------------------------------------------------------------


def test_a_new_experiment_is_a_custom_model_development_experiment(workdir):
    tracker = Tracker()
    experiment = tracker.client.get_experiment(tracker.experiment_id("hsgd-kind"))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert EXPERIMENT_KIND == {"mlflow.experimentKind": "custom_model_development"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("server")) as url:
        yield url


def _study_runs(tracker: Tracker, study: str) -> tuple[str, dict[int, str]]:
    """An experiment like a run's: a parent run and three ranked trial runs, trial 1 recommended."""
    experiment = tracker.experiment_id(f"hsgd-{study}")
    parent = tracker.open_parent(experiment, study, params={}, tags={})
    runs = {}
    for number, rank, order in ((0, 2, 3), (1, 1, 1), (2, 1, 2)):
        run_id = tracker.start_trial(
            experiment, parent, study, number, {"learning_rate": 0.1, "batch_size": 8}
        )
        metrics = {"rank/pareto_rank": rank, "rank/order": order, "val/loss": 0.3, "bound/risk_bound": 40.0}
        metrics["val/error"] = 0.1
        tags = {"hsgd.recommended": str(number == 1).lower(), "hsgd.pareto_rank": str(rank)}
        tracker.finish_trial(run_id, "COMPLETE", tags=tags, metrics=metrics)
        runs[number] = run_id
    return experiment, runs


def test_printed_links_open_the_trials_ranked_with_the_recommendation_filter(server):
    """The link format is MLflow 3's own: the served UI reads ``viewStateShareKey`` and the
    ``mlflow.sharedViewState.`` experiment tag; the state's filter and order, sent to the same
    server, give exactly the trial runs, ranked, and the recommended one."""
    tracker = Tracker(server)
    experiment, runs = _study_runs(tracker, "views")
    views = study_views(tracker, experiment, "views", server)

    pattern = rf"{re.escape(server)}/#/experiments/{experiment}/runs\?viewStateShareKey=([\w-]+)"
    pattern += "&workflowType=machine_learning"  # model-training mode, whatever the browser last used
    keys = {name: re.fullmatch(pattern, url).group(1) for name, url in views.items()}
    tags = requests.get(
        f"{server}/api/2.0/mlflow/experiments/get", params={"experiment_id": experiment}, timeout=30
    ).json()["experiment"]["tags"]
    stored = {t["key"]: t["value"] for t in tags}
    for name, key in keys.items():
        state = json.loads(stored[SHARED_VIEW_TAG + key])
        assert state == view_state("views", name)
        assert state["selectedColumns"] == list(COLUMNS)
        found = requests.post(
            f"{server}/api/2.0/mlflow/runs/search",
            json={
                "experiment_ids": [experiment],
                "filter": state["searchFilter"],
                "order_by": [f"{state['orderByKey']} {'ASC' if state['orderByAsc'] else 'DESC'}"],
            },
            timeout=30,
        ).json()["runs"]
        shown = [r["info"]["run_id"] for r in found]
        if name == "trials":  # every trial, rank 1 first, never the parent run
            assert sorted(shown) == sorted(runs.values()) and shown[-1] == runs[0]
        else:
            assert shown == [runs[1]]
    # The UI this server ships understands both names (MLflow's own "Share" link uses them).
    index = requests.get(f"{server}/", timeout=30).text
    bundle = re.search(r'src="(static-files/static/js/main\.[0-9a-f]+\.js)"', index).group(1)
    code = requests.get(f"{server}/{bundle}", timeout=60).text
    assert "viewStateShareKey" in code and SHARED_VIEW_TAG in code
    assert '"workflowType"' in code and '"machine_learning"' in code


# -- optuna-dashboard -------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("optuna_dashboard") is None, reason="the dashboard extra")
def test_ui_serves_the_study_in_optuna_dashboard(workdir):
    from hsgd_tune.search.storage import open_storage
    from hsgd_tune.search.study import create_or_resume

    path = write_tiny_study(workdir)
    create_or_resume(load_study(path), open_storage(None), None)  # a study, no trial needed
    ports = free_port(), free_port()
    cmd = [sys.executable, "-m", "hsgd_tune.cli", "ui", str(path), "--port", str(ports[0])]
    cmd += ["--dashboard-port", str(ports[1])]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline, lines = time.monotonic() + 240, []
        while time.monotonic() < deadline and not any(line.startswith("Ctrl-C") for line in lines):
            line = proc.stdout.readline()
            assert line, f"ui exited: {proc.stderr.read()}"
            lines.append(line)
        assert f"optuna-dashboard: http://127.0.0.1:{ports[1]}/\n" in lines
        studies = requests.get(f"http://127.0.0.1:{ports[1]}/api/studies", timeout=30).json()
        assert [s["study_name"] for s in studies["study_summaries"]] == ["tiny"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # ui stops both servers it started
            proc.wait(timeout=60)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{ports[1]}/api/studies", timeout=5)
