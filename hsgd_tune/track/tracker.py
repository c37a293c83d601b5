"""MLflow: one experiment per study, one parent run per study, one child run per trial.

Everything goes through ``MlflowClient`` with explicit run ids (thread-safe, no fluent state) and is
sent in batches: a trial makes a handful of round trips, not one per step (DESIGN.md §3).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import (
    MAX_ENTITIES_PER_BATCH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from hsgd_tune.errors import StorageError
from hsgd_tune.redact import redact, split_credentials

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
LOCAL_ARTIFACT_ROOT = Path("mlruns/artifacts")

#: Optuna trial state → MLflow run status (DESIGN.md §3).
RUN_STATUS = {
    "RUNNING": "RUNNING",
    "WAITING": "SCHEDULED",
    "COMPLETE": "FINISHED",
    "FAIL": "FAILED",
    "PRUNED": "KILLED",
}

STUDY_TAG, ROLE_TAG, TRIAL_TAG, STATE_TAG = "hsgd.study", "hsgd.role", "optuna.trial_number", "optuna.state"
#: MLflow 3 opens an experiment of this kind on its runs, not on the GenAI overview (traces, tokens).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite store under ``mlruns/``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


#: Tracking-store URI schemes MLflow knows (before any ``+driver``); others fail at once, in one line.
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def check_tracking_uri(uri: str) -> None:
    """A tracking URI that cannot work fails here, in one line, before any store is touched."""
    scheme = uri.split("://")[0].split("+")[0].lower() if "://" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise StorageError(
            f"MLflow tracking store {redact(uri)} (MLFLOW_TRACKING_URI) cannot be used: unknown scheme "
            f"{scheme!r} (use one of {', '.join(s for s in TRACKING_SCHEMES if s)})"
        )
    if scheme == "sqlite" and uri != DEFAULT_TRACKING_URI:  # the default's folder is ours to create
        folder = Path(uri.split(":///", 1)[-1]).parent
        if not folder.is_dir():
            raise StorageError(
                f"MLflow tracking store {redact(uri)} (MLFLOW_TRACKING_URI) cannot be used: "
                f"its folder {folder} does not exist"
            )


def credentials_to_environment(uri: str) -> str:
    """``http://user:pw@host`` → ``http://host``, with user and password handed to MLflow through
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (unless those are set already), so the
    password is sent as HTTP basic auth and never shown, logged or stored with the URI."""
    if not uri.startswith(("http://", "https://")):
        return uri
    clean, user, password = split_credentials(uri)
    if user is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
    if password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    return clean


def filter_value(value: str) -> str:
    """``value`` quoted for an MLflow filter string. MLflow's filter grammar has no escapes: a value
    is quoted with whichever quote it does not hold (study names cannot hold ``"``, config.py)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise StorageError(f"MLflow cannot search for a value holding both kinds of quote: {value!r}")


def trial_run_name(number: int) -> str:
    return f"trial-{number:04d}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}: nested config as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Tracker:
    """The study's MLflow experiment and runs."""

    def __init__(self, uri: str | None = None, must_exist: bool = False):
        """``must_exist``: the default local store must be there already (commands that read a
        study's runs; MLflow would quietly create an empty database in place of a deleted one)."""
        # The password goes to MLflow's own variables, not into self.uri, which messages show.
        self.uri = credentials_to_environment(uri or tracking_uri())
        self.local = self.uri == DEFAULT_TRACKING_URI
        database = LOCAL_ARTIFACT_ROOT.parent / "mlflow.db"
        if self.local and must_exist and not database.exists():
            raise StorageError(
                f"the MLflow database {database} does not exist (deleted?): the study's runs are gone"
            )
        if self.local:
            LOCAL_ARTIFACT_ROOT.mkdir(parents=True, exist_ok=True)
            # Pin the relative default to this directory: MLflow caches stores (and their open
            # SQLite connections) by URI, so after a chdir a relative URI would still write to the
            # first directory's database while Optuna's journal follows the new directory.
            self.uri = f"sqlite:///{LOCAL_ARTIFACT_ROOT.parent.resolve() / 'mlflow.db'}"
            write_ahead_log(LOCAL_ARTIFACT_ROOT.parent.resolve() / "mlflow.db")
        check_tracking_uri(self.uri)
        try:
            self.client = MlflowClient(self.uri)
        except Exception as exc:
            raise StorageError(
                f"MLflow tracking store {self.uri} cannot be used: {_first_line(exc)}"
            ) from None
        self.artifact_uris: dict[str, str] = {}  # run id → artifact location, for runs started here
        # MLflow announces creating and migrating its database at INFO; users need not see it.
        logging.getLogger("mlflow").setLevel(logging.WARNING)

    # -- study level ------------------------------------------------------------------------

    def experiment_id(self, name: str, create: bool = True) -> str | None:
        """The experiment's id, created when missing (a concurrent creator wins quietly)."""
        try:
            found = self.client.get_experiment_by_name(name)
            if found is not None or not create:
                return found.experiment_id if found else None
            location = LOCAL_ARTIFACT_ROOT.resolve().as_uri() if self.local else None
            try:
                return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
            except Exception:
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
                return found.experiment_id
        except Exception as exc:
            raise StorageError(
                f"MLflow tracking store {self.uri} cannot be used: {_first_line(exc)}"
            ) from None

    def parent_run_id(self, experiment_id: str, study: str) -> str | None:
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'study' and tags.`{STUDY_TAG}` = {filter_value(study)}",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def open_parent(
        self, experiment_id: str, study: str, params: Mapping[str, Any], tags: Mapping[str, str]
    ) -> str:
        """The study's parent run, created on first use and set RUNNING again on resume."""
        run_id = self.parent_run_id(experiment_id, study)
        if run_id is None:
            run = self.client.create_run(
                experiment_id, run_name=study, tags={ROLE_TAG: "study", STUDY_TAG: study}
            )
            run_id = run.info.run_id
            self.log(run_id, params=params)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.log(run_id, tags=tags)
        return run_id

    def close_parent(self, run_id: str, metrics: Mapping[str, float], status: str = "FINISHED") -> None:
        self.log(run_id, metrics=metrics)
        self.client.set_terminated(run_id, status=status)

    # -- trial level ------------------------------------------------------------------------

    def start_trial(
        self, experiment_id: str, parent_id: str, study: str, number: int, params: Mapping[str, Any]
    ) -> str:
        tags = {
            "mlflow.parentRunId": parent_id,
            ROLE_TAG: "trial",
            STUDY_TAG: study,
            TRIAL_TAG: str(number),
            STATE_TAG: "RUNNING",
        }
        run = self.client.create_run(experiment_id, run_name=trial_run_name(number), tags=tags)
        self.log(run.info.run_id, params=params)
        self.artifact_uris[run.info.run_id] = run.info.artifact_uri
        return run.info.run_id

    def local_artifact_dir(self, run_id: str) -> Path | None:
        """The artifact folder of a run this tracker started, when it lies on a local or mounted disk
        (a ``file:`` artifact location, as the default store's): a trial writes its artifacts there
        directly, as ``log_artifacts`` would have copied them, instead of writing them twice. None
        for remote artifact stores (an MLflow server, S3), which take ``log_artifacts``."""
        uri = self.artifact_uris.get(run_id, "")
        if not uri.startswith("file:"):
            return None
        return Path(url2pathname(urlparse(uri).path))

    def finish_trial(
        self,
        run_id: str,
        state: str,
        tags: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
        step: int = 0,
        curves: Mapping[str, tuple[Iterable[int], Iterable[float]]] | None = None,
        artifacts: Path | None = None,
    ) -> None:
        """Log the trial's last values with its Optuna state and end the run with the matching
        status (FAIL → FAILED, PRUNED → KILLED): three round trips for a whole trial (artifacts,
        one batch, the status). ``artifacts``: a folder to log, then delete."""
        if artifacts is not None:
            self.log_artifacts(run_id, artifacts)
            shutil.rmtree(artifacts, ignore_errors=True)
        tags = {**(tags or {}), STATE_TAG: state}
        self.log(run_id, metrics=metrics, step=step, curves=curves, tags=tags)
        self.client.set_terminated(run_id, status=RUN_STATUS[state])

    def trial_runs(self, experiment_id: str, study: str) -> dict[int, Any]:
        """Trial number → run, for every child run of the study."""
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [experiment_id],
                filter_string=f"tags.`{ROLE_TAG}` = 'trial' and tags.`{STUDY_TAG}` = {filter_value(study)}",
                max_results=1000,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
        return {int(r.data.tags[TRIAL_TAG]): r for r in runs}

    # -- runs of their own and the model registry (pick, train) ----------------------------

    def create_run(
        self, experiment_id: str, run_name: str, tags: Mapping[str, str], params: Mapping[str, Any]
    ) -> str:
        """A new run (``pick``'s lineage, ``train``'s result), never a trial's: a finished trial's
        run keeps its times."""
        run = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
        self.log(run.info.run_id, params=params)
        return run.info.run_id

    def describe_version(
        self, name: str, version: str, tags: Mapping[str, str], description: str, alias: str
    ) -> None:
        """Tag and describe a registered model version, then point ``alias`` at it: last, so that the
        alias only ever names a version that carries its whole statement."""
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, str(value)[:5000])
        self.client.update_model_version(name, version, description=description)
        self.client.set_registered_model_alias(name, alias, version)

    # -- logging ----------------------------------------------------------------------------

    def log(
        self,
        run_id: str,
        metrics: Mapping[str, float] | None = None,
        step: int = 0,
        curves: Mapping[str, tuple[Iterable[int], Iterable[float]]] | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Log in as few batches as MLflow allows. Non-finite values are never logged as metrics:
        they become ``hsgd.nonfinite.<key>`` tags, so sorting and ranking never meet a NaN.
        ``metrics`` are logged at ``step``; ``curves`` map a key to (steps, values)."""
        now = int(time.time() * 1000)
        entries: list[Metric] = []
        tags = dict(tags or {})
        for key, value in (metrics or {}).items():
            _append_metric(entries, tags, key, value, step, now)
        for key, (steps, values) in (curves or {}).items():
            for step, value in zip(steps, values, strict=True):
                _append_metric(entries, tags, key, value, int(step), now)
        # Whatever a tag or param holds (a storage URL, an error message), never a password.
        param_list = [Param(k, redact(_param_value(v))) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, redact(str(v))[:5000]) for k, v in tags.items()]
        for batch in _batches(entries, param_list, tag_list):
            self.client.log_batch(run_id, **batch, synchronous=True)

    def log_artifacts(self, run_id: str, local_dir: Path) -> None:
        self.client.log_artifacts(run_id, str(local_dir))


@contextlib.contextmanager
def fluent_run(uri: str, run_id: str) -> Iterator[None]:
    """MLflow's fluent API (``log_model`` needs it) on run ``run_id`` of store ``uri``, leaving the
    process's ``MLFLOW_TRACKING_URI`` as it was: ``mlflow.set_tracking_uri`` also sets that variable,
    which every later :class:`Tracker` of this process would read (and child processes inherit).
    The run ends FINISHED, or FAILED if the block raises."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(run_id=run_id):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def write_ahead_log(database: Path) -> None:
    """Put the local SQLite store in write-ahead-log mode (persistent, set once per file).

    In SQLite's default rollback-journal mode every commit syncs the journal, the database and the
    folder; MLflow commits several times per ``log_batch`` (params, metrics, tags), so a trial paid
    for a dozen such commits. In WAL mode a commit appends to the log and syncs it once; with
    ``synchronous`` left at FULL a committed transaction is as durable as before (it survives a
    crash and a power cut). Only for the local default store: WAL needs a local disk (shared memory),
    not a network one.
    """
    database.parent.mkdir(parents=True, exist_ok=True)
    # Best effort: a read-only or locked store stays in its mode, and MLflow reports what it cannot do.
    with (
        contextlib.suppress(sqlite3.Error),
        contextlib.closing(sqlite3.connect(database, timeout=20)) as conn,
    ):
        conn.execute("PRAGMA journal_mode=WAL")


def _batches(metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> Iterator[dict[str, list]]:
    """Split into as few ``log_batch`` calls as MLflow's limits allow: each call holds at most 100
    params, 100 tags and 1000 entities in all (every call is a database transaction)."""
    while metrics or params or tags:
        p, t = params[:MAX_PARAMS_TAGS_PER_BATCH], tags[:MAX_PARAMS_TAGS_PER_BATCH]
        m = metrics[: min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(p) - len(t))]
        yield {"metrics": m, "params": p, "tags": t}
        metrics, params, tags = metrics[len(m) :], params[len(p) :], tags[len(t) :]


def _append_metric(
    entries: list[Metric], tags: dict[str, str], key: str, value: float, step: int, now: int
) -> None:
    value = float(value)
    if math.isfinite(value):
        entries.append(Metric(key, value, now, step))
    else:
        tags[f"hsgd.nonfinite.{key}"] = repr(value)


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return str(value)[:6000]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
