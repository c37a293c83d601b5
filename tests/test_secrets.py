"""Passwords are never shown or stored, credentialed URLs work, and names with quotes or any script
work end to end (MLflow filter strings are quoted, not pasted)."""

from __future__ import annotations

import base64
import os
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from tiny_study import TINY_STUDY

from hsgd_tune.cli.main import main
from hsgd_tune.errors import StorageError
from hsgd_tune.redact import redact, split_credentials
from hsgd_tune.search.storage import database_url
from hsgd_tune.search.worker import check_tracking
from hsgd_tune.track.tracker import Tracker, filter_value

SECRET = "hunter2"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://u:hunter2@host/db", "postgresql://u:***@host/db"),
        ("postgresql+psycopg2://u:hunter2@host:5432/db", "postgresql+psycopg2://u:***@host:5432/db"),
        ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),  # an unescaped @ in the password
        ("http://bob:hunter2@tracking:5000", "http://bob:***@tracking:5000"),
        (
            "storage 'mysql://root:hunter2@h/x' cannot be used",
            "storage 'mysql://root:***@h/x' cannot be used",
        ),
        (
            "a http://u:hunter2@h and postgresql://v:hunter2@k/d",
            "a http://u:***@h and postgresql://v:***@k/d",
        ),
        ("postgresql://h/db?user=u&password=hunter2", "postgresql://h/db?user=u&password=***"),
        ("host=h password=hunter2 dbname=x", "host=h password=*** dbname=x"),
        ("postgresql://u@host/db", "postgresql://u@host/db"),  # no password: unchanged
        ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
        ("mlruns/optuna-journal.log", "mlruns/optuna-journal.log"),
        ("postgresql://u:***@host/db", "postgresql://u:***@host/db"),  # redacting twice changes nothing
    ],
)
def test_redact_hides_every_password_and_nothing_else(text, shown):
    assert redact(text) == shown


def test_split_credentials_takes_user_and_password_out_of_the_url():
    assert split_credentials("http://bob:p%40ss@host:5000/x") == ("http://host:5000/x", "bob", "p@ss")
    assert split_credentials("http://u:p@ss@h:1") == ("http://h:1", "u", "p@ss")
    assert split_credentials("http://host:5000") == ("http://host:5000", None, None)


@pytest.mark.parametrize(
    ("value", "quoted"), [("plain", "'plain'"), ("bob's study", '"bob\'s study"'), ("研究", "'研究'")]
)
def test_filter_values_are_quoted_with_the_quote_they_do_not_hold(value, quoted):
    assert filter_value(value) == quoted


def test_a_filter_value_with_both_quotes_is_refused_in_one_line():
    with pytest.raises(StorageError, match="both kinds of quote"):
        filter_value("""it's "quoted" """)


# ---------------------------------------------------------------------------------------------
# A credentialed tracking URL: the password is sent as basic auth, and shown nowhere
# ---------------------------------------------------------------------------------------------


class _BasicAuthHealth(BaseHTTPRequestHandler):
    expected = "Basic " + base64.b64encode(b"bob:" + SECRET.encode()).decode()

    def do_GET(self):  # noqa: N802 (http.server's name)
        ok = self.path == "/health" and self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"unauthorized")

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_server():
    server = HTTPServer(("127.0.0.1", 0), _BasicAuthHealth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def no_mlflow_credentials(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def test_a_credentialed_tracking_url_authenticates_and_keeps_the_password_out_of_the_uri(
    auth_server, no_mlflow_credentials, monkeypatch
):
    url = f"http://bob:{SECRET}@{auth_server}"
    check_tracking(url)  # the server answers 401 without the right basic auth
    tracker = Tracker(url)
    assert tracker.uri == f"http://{auth_server}"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob"  # how MLflow's client sends them
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET


def test_a_wrong_tracking_password_fails_in_one_line_without_showing_it(auth_server, no_mlflow_credentials):
    with pytest.raises(StorageError) as info:
        check_tracking(f"http://bob:wrong-{SECRET}@{auth_server}")
    assert "Unauthorized" in str(info.value) or "401" in str(info.value)
    assert SECRET not in str(info.value) and f"http://{auth_server}" in str(info.value)


# ---------------------------------------------------------------------------------------------
# End to end: a PostgreSQL storage URL with a password, and a name with a quote and unicode
# ---------------------------------------------------------------------------------------------

FAST = TINY_STUDY.replace("steps = 60", "steps = 20").replace("n_trials = 5", "n_trials = 2")
FAST += '\n[diagnostics]\ntrials = "none"\n'


def _admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(
        host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=5
    )
    conn.autocommit = True
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


@pytest.fixture
def postgres_with_password(request) -> str:
    """A fresh database, reached with a URL holding a password (the server trusts local users, so
    the password is not checked: what matters is where it ends up)."""
    try:
        _admin("SELECT 1")
    except Exception as exc:
        pytest.skip(f"no PostgreSQL server on 127.0.0.1:5432 ({str(exc).strip().splitlines()[0]})")
    name = f"hsgd_test_{uuid.uuid4().hex[:12]}"
    _admin(f"CREATE DATABASE {name}")
    request.addfinalizer(lambda: _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    return f"postgresql://postgres:{SECRET}@127.0.0.1:5432/{name}"


def test_a_storage_password_is_stored_and_shown_nowhere(
    workdir, capsys, postgres_with_password, one_torch_thread
):
    (workdir / "tiny.toml").write_text(FAST, encoding="utf-8")
    assert main(["run", "tiny.toml", "--quiet", "--storage", postgres_with_password]) == 0
    assert main(["rank", "tiny.toml", "--storage", postgres_with_password]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    study = optuna.load_study(study_name="tiny", storage=database_url(postgres_with_password))
    assert SECRET not in repr(study.user_attrs) and "postgres:***@" in study.user_attrs["config"]
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hsgd-tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # the parent and two trials
    for run in runs:
        assert SECRET not in repr(run.data.tags) + repr(run.data.params)
    parent = next(r for r in runs if r.data.tags.get("hsgd.role") == "study")
    assert parent.data.tags["hsgd.storage"].startswith("postgresql://postgres:***@127.0.0.1")
    for path in (workdir / "mlruns").rglob("*"):  # not in any byte of the local stores either
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_a_name_with_a_quote_and_unicode_runs_ranks_and_reports(workdir, capsys, one_torch_thread):
    name = "bob's étude 研究"
    (workdir / "s.toml").write_text(FAST.replace('name = "tiny"', f'name = "{name}"'), encoding="utf-8")
    assert main(["run", "s.toml", "--quiet"]) == 0
    assert main(["rank", "s.toml"]) == 0
    assert main(["report", "s.toml"]) == 0
    capsys.readouterr()
    tracker = Tracker()
    experiment_id = tracker.experiment_id(f"hsgd-{name}", create=False)
    assert sorted(tracker.trial_runs(experiment_id, name)) == [0, 1]
    parent = tracker.client.get_run(tracker.parent_run_id(experiment_id, name))
    assert parent.data.tags["hsgd.recommended_trial"] in ("0", "1")
    assert (Path("mlruns/reports") / name / "index.html").is_file()
