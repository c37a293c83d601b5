"""Opening an Optuna storage (journal file or database) and the study lock that serialises workers
across processes.

The study lock is a PostgreSQL transaction-level advisory lock (released by the server when its
holder dies) or an ``flock`` on a file next to the journal (released by the kernel when its holder
dies). Other databases get no cross-process lock, so workers refuse them (:func:`check_shareable`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from hsgd_tune.errors import ConfigError, StorageError
from hsgd_tune.redact import redact

DEFAULT_JOURNAL = Path("mlruns/optuna-journal.log")
#: Seconds between a running trial's heartbeats on PostgreSQL; a trial is stale after 3 missed.
HEARTBEAT_S = 10
#: A trial whose worker died is queued again at most this often (a trial that kills every worker
#: that runs it, e.g. by running out of memory, must not loop forever).
MAX_RETRY = 2


def storage_description(url: str | None) -> str:
    """The storage as users may see it: where it is, never its password."""
    return redact(url) or f"journal file {DEFAULT_JOURNAL}"


def open_storage(url: str | None, heartbeat: int | None = None) -> BaseStorage:
    """A journal file under ``mlruns/`` by default; a database URL (``postgresql://…``) or a
    journal file path otherwise. Databases get heartbeats every ``heartbeat`` s."""
    try:
        if url is None or "://" not in url:
            path = Path(url) if url else DEFAULT_JOURNAL
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        return open_database(url, heartbeat or HEARTBEAT_S)
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise StorageError(f"Optuna storage {redact(url)!r} cannot be used: {redact(reason)}") from None


def database_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; the ``postgres`` extra installs
    psycopg2, so use that driver unless psycopg 3 is there."""
    bare = url.startswith("postgresql://")
    if bare and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def is_postgres(url: str | None) -> bool:
    return bool(url) and url.split("://")[0].split("+")[0] == "postgresql"


def open_database(url: str, heartbeat: int = HEARTBEAT_S) -> RDBStorage:
    """An Optuna database storage with heartbeats and one retry per dead trial.

    Several workers may open a fresh PostgreSQL database at once; Optuna then creates its tables
    concurrently and one of them fails, so that step runs under an advisory lock.
    """
    url = database_url(url)
    kwargs = {}
    if is_postgres(url):
        # An unreachable host should fail in seconds, not after the TCP timeout.
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        with _init_lock(url):
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat,
                grace_period=3 * heartbeat,
                heartbeat_stale_trial_callback=retry_callback(),
                **kwargs,
            )


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Queue a dead worker's trial once more, with the same parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


@contextlib.contextmanager
def _init_lock(url: str) -> Iterator[None]:
    if not is_postgres(url):
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_key("init")})
            yield
    finally:
        engine.dispose()


def check_shareable(url: str | None) -> None:
    """Workers need a store with a cross-process lock: PostgreSQL, or a journal file (one host)."""
    if url is not None and "://" in url and not is_postgres(url):
        raise ConfigError(
            "--storage",
            "must be a postgresql:// URL or a journal file path for several workers "
            "(other databases have no cross-process lock; never SQLite across processes)",
            url,
        )


def _lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key from a name."""
    return int.from_bytes(hashlib.sha256(f"hsgd_tune:{name}".encode()).digest()[:8], "big", signed=True)


class StudyLock:
    """Serialises, across worker processes, the few steps that must not interleave: creating the
    study and its parent run, failing dead trials, and taking a trial slot."""

    def __init__(self, storage: optuna.storages.BaseStorage, url: str | None, study_name: str):
        self.storage, self.study_name = storage, study_name
        self.local = threading.Lock()
        self.path = None
        if isinstance(storage, JournalStorage):
            journal = Path(url) if url else DEFAULT_JOURNAL
            self.path = journal.with_name(journal.name + ".hsgd-lock")

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.local:
            if isinstance(self.storage, RDBStorage) and is_postgres(str(self.storage.engine.url)):
                import sqlalchemy

                with self.storage.engine.begin() as conn:  # the lock ends with this transaction
                    key = _lock_key(f"study:{self.study_name}")
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
                    yield
            elif self.path is not None:
                with open(self.path, "a") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX)  # released on close, or by the kernel on death
                    yield
            else:
                yield
