"""Issue #5: several workers share one study, against a real PostgreSQL server and a real
``mlflow server`` process; workers killed with SIGKILL or stopped with SIGTERM.

Each test session makes its own PostgreSQL databases (random names) and drops them afterwards. The
PostgreSQL tests are skipped only when no server answers on 127.0.0.1:5432 (CI has one).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from hsgd_tune.cli.main import main
from hsgd_tune.search.storage import database_url
from hsgd_tune.search.worker import PARENT_ATTR

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

STUDY = """\
name = "{name}"
seed = 0
[data]
source = "digits"
n_train = 100
n_val = 100
[model]
kind = "mlp"
widths = [8]
[search.learning_rate]
low = 0.01
high = 0.3
# A fine grid (about 1500 values): workers proposing the same point would then be a seeding fault,
# not two random draws snapped to one of the default grid's 16 values.
points_per_decade = 1000
[search.batch_size]
choices = [8, 16, 32]
[training]
steps = {steps}
record_every = 10
[certificate]
enabled = false  # the PAC-Bayes and tail-index work is not what these tests are about; keep trials short
[diagnostics]
tail_index = false
analytic = false
[run]
n_trials = {n_trials}
"""


def _admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(
        host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5
    )
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def _new_database(request) -> str:
    name = f"hsgd_test_{uuid.uuid4().hex[:12]}"
    _admin(f"CREATE DATABASE {name}")
    request.addfinalizer(lambda: _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(scope="module")
def postgres(request) -> str:
    """A fresh, empty database for Optuna; dropped after the module."""
    try:
        _admin("SELECT 1")
    except Exception as exc:
        pytest.skip(f"no PostgreSQL server on 127.0.0.1:5432 ({str(exc).strip().splitlines()[0]})")
    return _new_database(request)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(request, postgres, tmp_path_factory) -> str:
    """A real ``mlflow server`` process, its runs in PostgreSQL (as in the README), artifacts on disk."""
    backend = database_url(_new_database(request))
    artifacts = tmp_path_factory.mktemp("artifacts")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server") / "mlflow.log", "w")  # noqa: SIM115 (closed in stop)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--default-artifact-root", artifacts.as_uri(), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def stop() -> None:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()

    request.addfinalizer(stop)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # its first start migrates the database: slow on a busy machine
    while time.monotonic() < deadline:
        assert server.poll() is None, Path(log.name).read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return uri
        except OSError:
            time.sleep(0.5)
    pytest.fail("mlflow server did not answer /health within 300 s")


def _study_file(folder: Path, name: str, n_trials: int, steps: int = 30) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name, n_trials=n_trials, steps=steps))
    return path


def _worker(study: Path, storage: str | None, tracking: str | None, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
    command = [sys.executable, "-m", "hsgd_tune.cli", "worker", str(study), "--threads", "1", *extra]
    if storage:
        command += ["--storage", storage]
    return subprocess.Popen(
        command, cwd=study.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait(procs: list[subprocess.Popen], timeout: float = 400) -> list[int]:
    codes = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        codes.append(proc.returncode)
        if proc.returncode not in (0, 128 + signal.SIGTERM, -signal.SIGKILL):
            print(out)
    return codes


def _study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=database_url(storage))


def _runs(tracking: str, experiment: str):
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("hsgd.role") == "study"]
    children = [r for r in runs if r.data.tags.get("hsgd.role") == "trial"]
    return parents, children


def _count(study: optuna.Study, state: TrialState) -> int:
    return sum(t.state == state for t in study.get_trials(deepcopy=False))


def test_four_workers_finish_exactly_the_study_budget_each_trial_logged_once(
    tmp_path, postgres, mlflow_server
):
    study_file = _study_file(tmp_path, "four", n_trials=40)
    codes = _wait([_worker(study_file, postgres, mlflow_server, "--heartbeat", "2") for _ in range(4)])
    assert codes == [0, 0, 0, 0]

    study = _study(postgres, "four")
    assert _count(study, TrialState.COMPLETE) == 40  # the budget is the study's, not each worker's
    assert len(study.trials) == 40  # no trial was started beyond it
    parents, children = _runs(mlflow_server, "hsgd-four")
    assert len(parents) == 1, "one parent run, whatever the number of workers"
    assert study.user_attrs[PARENT_ATTR] == parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in children)
    assert numbers == list(range(40)), "one child run per trial, no duplicates"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.info.status for r in children} == {"FINISHED"}
    workers = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert len(workers) > 1, "the trials were shared between workers"


def _running_trial_of(study: optuna.Study, pid: int, timeout: float = 120):
    """Wait until worker ``pid`` is mid-trial, with its MLflow run open."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker", {}).get("pid") == pid and "mlflow_run_id" in t.user_attrs:
                return t
        time.sleep(0.05)
    pytest.fail(f"worker {pid} never started a trial")


def test_a_worker_killed_mid_trial_has_its_trial_failed_and_rerun(tmp_path, postgres, mlflow_server):
    # Trials long enough (about half a second each) that the kill lands mid-trial.
    study_file = _study_file(tmp_path, "killed", n_trials=6, steps=6000)
    victim = _worker(study_file, postgres, mlflow_server, "--heartbeat", "1")
    study = _study_retrying(postgres, "killed")
    trial = _running_trial_of(study, victim.pid)
    survivor = _worker(study_file, postgres, mlflow_server, "--heartbeat", "1")
    victim.send_signal(signal.SIGKILL)
    assert _wait([victim, survivor]) == [-signal.SIGKILL, 0]

    trials = study.get_trials(deepcopy=False)
    killed = trials[trial.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params  # re-run with the same parameters
    assert _count(study, TrialState.COMPLETE) == 6
    assert _count(study, TrialState.RUNNING) == 0
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in _runs(mlflow_server, "hsgd-killed")[1]}
    assert runs[trial.number].info.status == "FAILED"
    assert "worker died" in runs[trial.number].data.tags["hsgd.fail_reason"]
    assert {r.info.status for n, r in runs.items() if n != trial.number} == {"FINISHED"}


def _study_retrying(storage: str, name: str, timeout: float = 120) -> optuna.Study:
    """The study once its first worker has created it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return _study(storage, name)
        except KeyError:
            time.sleep(0.2)
    pytest.fail(f"study {name} was never created")


def test_sigterm_finishes_the_running_trial_and_a_restarted_worker_continues(tmp_path):
    # Journal storage and the local MLflow store: workers on one machine.
    # Trials long enough (about half a second each) that the signal lands before the budget is met.
    study_file = _study_file(tmp_path, "term", n_trials=4, steps=6000)
    journal = str(tmp_path / "mlruns" / "optuna-journal.log")
    worker = _worker(study_file, None, None)
    from hsgd_tune.search.storage import open_storage

    deadline = time.monotonic() + 120
    while not Path(journal).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    study = _journal_study_retrying(open_storage, journal, "term")
    trial = _running_trial_of(study, worker.pid)
    worker.send_signal(signal.SIGTERM)
    assert _wait([worker]) == [128 + signal.SIGTERM]  # stopped before the budget was met
    assert study.get_trials(deepcopy=False)[trial.number].state == TrialState.COMPLETE  # finished
    assert _count(study, TrialState.RUNNING) == 0

    assert _wait([_worker(study_file, None, None)]) == [0]
    assert _count(study, TrialState.COMPLETE) == 4
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("hsgd-term").experiment_id])
    assert sum(r.data.tags.get("hsgd.role") == "study" for r in runs) == 1
    assert sorted(r.info.status for r in runs if r.data.tags.get("hsgd.role") == "trial") == ["FINISHED"] * 4


def _journal_study_retrying(open_storage, journal: str, name: str) -> optuna.Study:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            return optuna.load_study(study_name=name, storage=open_storage(journal))
        except KeyError:
            time.sleep(0.2)
    pytest.fail(f"study {name} was never created")


def test_run_with_two_local_workers_meets_the_budget_exactly(workdir, capsys):
    study_file = _study_file(workdir, "pair", n_trials=6)
    assert main(["run", str(study_file), "--workers", "2"]) == 0
    from hsgd_tune.search.storage import open_storage

    study = optuna.load_study(study_name="pair", storage=open_storage(None))
    assert _count(study, TrialState.COMPLETE) == 6 and len(study.trials) == 6
    pids = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert os.getpid() not in pids  # the trials ran in the worker processes
    # Workers that start together are seeded apart: no point is proposed twice (TPE starts random).
    assert len({t.params["learning_rate"] for t in study.trials}) == 6
    assert "pair: 6/6 trials finished (6 this run)" in capsys.readouterr().out


# -- bad input: one line, non-zero exit, nothing created --------------------------------------


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("hsgd-tune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_bad_storage_url_gives_one_line_and_creates_nothing(workdir, capsys):
    study_file = _study_file(workdir, "bad", n_trials=2)
    assert main(["worker", str(study_file), "--storage", "nosuchdb://host/db"]) == 2
    assert "postgresql:// URL or a journal file path" in _one_line(capsys.readouterr().err)
    assert main(["worker", str(study_file), "--storage", "sqlite:///x.db"]) == 2
    _one_line(capsys.readouterr().err)
    assert (
        main(["worker", str(study_file), "--storage", "postgresql://postgres@127.0.0.1:5432/hsgd_no_such_db"])
        == 1
    )
    assert "does not exist" in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in workdir.iterdir()) == ["bad.toml"]


def test_an_unreachable_database_gives_one_line(workdir, capsys):
    study_file = _study_file(workdir, "unreachable", n_trials=2)
    url = f"postgresql://postgres@127.0.0.1:{_free_port()}/nothing"
    assert main(["worker", str(study_file), "--storage", url]) == 1
    line = _one_line(capsys.readouterr().err)
    assert url in line and "refused" in line
    assert sorted(p.name for p in workdir.iterdir()) == ["unreachable.toml"]


def test_a_tracking_server_that_is_down_gives_one_line_and_no_study(workdir, capsys, monkeypatch, postgres):
    study_file = _study_file(workdir, "down", n_trials=2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    started = time.monotonic()
    assert main(["worker", str(study_file), "--storage", postgres]) == 1
    assert time.monotonic() - started < 60  # not MLflow's minutes of retries
    assert "MLflow tracking server" in _one_line(capsys.readouterr().err)
    names = {s.study_name for s in optuna.get_all_study_summaries(database_url(postgres))}
    assert "down" not in names  # no partial study
