"""The hostile-input corpus: every case in ``cases.toml`` is a mistake or an attack a user could make
(study files, CSVs, model entry points, names, URLs, command-line options, faults of the disk and
the stores). Each must end with the documented exit code and one line on stderr, without a
traceback, naming the problem; and must leave every file as it was: no study, experiment, run or
report created, nothing of the user's deleted, no password printed.

The cases run in-process (``hsgd_tune.cli.main.main`` in an empty working directory), so the whole corpus
takes seconds, not one interpreter start per case. Cases that need an existing study get a copy of
one tiny finished study, made once per session.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CORPUS = tomllib.loads((HERE / "cases.toml").read_text(encoding="utf-8"))
BASE_STUDY = CORPUS["base"]["study"]
CASES = CORPUS["case"]
PREFIX = "hsgd-tune: error: "
#: Files every case starts with: the user's own, which no command may delete or change.
USER_FILES = {"thesis.txt": "my thesis\n", "notes/plan.md": "plan\n", "data.csv": "a,b,y\n1,2,0\n3,4,1\n"}


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` → its SHA-256 (what 'nothing created, nothing deleted' compares).

    A SQLite database is compared by its contents: in write-ahead-log mode (the local MLflow store)
    even a reader moves pages between ``-wal`` and the database file, and touches ``-shm``."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()]
    return {
        str(p.relative_to(folder)): _sqlite_digest(p) if p.suffix == ".db" else _bytes_digest(p)
        for p in files
        if not p.name.endswith((".db-wal", ".db-shm"))
    }


def _bytes_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sqlite_digest(path: Path) -> str:
    """SHA-256 of the database's SQL dump (its tables and rows, whatever sits in the WAL file)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return hashlib.sha256("\n".join(db.iterdump()).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# One tiny finished study, copied into the cases that need an existing one
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory) -> Path:
    """A folder with ``tiny.toml`` and its stores under ``mlruns/`` (2 finished trials)."""
    from hsgd_tune.search.runner import run_study
    from hsgd_tune.studyfile.config import load_study

    folder = tmp_path_factory.mktemp("hostile-template")
    (folder / "tiny.toml").write_text(
        BASE_STUDY.replace('name = "hostile"', 'name = "tiny"'), encoding="utf-8"
    )
    previous = Path.cwd()
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(folder)
    try:
        run_study(load_study("tiny.toml"), progress=False)
    finally:
        os.chdir(previous)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    _drop_cached_stores()
    return folder


def _drop_cached_stores() -> None:
    """MLflow caches SQLite stores by URI; a case's copy of the study must be opened afresh."""
    with contextlib.suppress(Exception):
        from mlflow.tracking._tracking_service import utils

        utils._tracking_store_registry._get_sqlalchemy_store.cache_clear()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Faults: named set-ups a case asks for with ``fault = "..."``
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _immutable_journal(folder: Path, monkeypatch) -> Iterator[None]:
    journal = folder / "mlruns" / "optuna-journal.log"
    if subprocess.run(["chattr", "+i", str(journal)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here (needs root on ext4/xfs)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(journal)], check=True)


@contextlib.contextmanager
def _deleted_mlflow_db(folder: Path, monkeypatch) -> Iterator[None]:
    (folder / "mlruns" / "mlflow.db").unlink()
    yield


@contextlib.contextmanager
def _full_disk_when_logging(folder: Path, monkeypatch) -> Iterator[None]:
    """The disk fills up while a trial writes its artifacts (the first write a trial makes)."""

    def no_space(outcome, artifacts: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(artifacts / "trajectories.npz"))

    monkeypatch.setattr("hsgd_tune.search.objective.write_artifacts", no_space)
    yield


def _legacy_study_named(name: str) -> Callable:
    """A study an older version let through: the tiny study copied under a name now refused."""

    @contextlib.contextmanager
    def setup(folder: Path, monkeypatch) -> Iterator[None]:
        import optuna

        from hsgd_tune.search.storage import open_storage

        storage = open_storage(str(folder / "mlruns" / "optuna-journal.log"))
        optuna.copy_study(
            from_study_name="tiny", from_storage=storage, to_storage=storage, to_study_name=name
        )
        yield

    return setup


FAULTS: dict[str, Callable] = {
    "immutable-journal": _immutable_journal,
    "deleted-mlflow-db": _deleted_mlflow_db,
    "full-disk-when-logging": _full_disk_when_logging,
    "legacy-study-dotdot": _legacy_study_named(".."),
    "legacy-study-slash": _legacy_study_named("../../escape"),
}


def _failed_trial_run_is_not_running(folder: Path) -> None:
    """After a fault in a trial: its Optuna trial failed, its MLflow run FAILED (never RUNNING)."""
    import optuna
    from mlflow import MlflowClient

    from hsgd_tune.search.storage import open_storage

    study = optuna.load_study(
        study_name="tiny", storage=open_storage(str(folder / "mlruns/optuna-journal.log"))
    )
    last = study.trials[-1]
    assert last.state.name == "FAIL", last.state
    client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(last.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED", run.info.status


AFTER: dict[str, Callable[[Path], None]] = {"failed-trial-run": _failed_trial_run_is_not_running}


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------


def _study_text(case: dict) -> str | None:
    if "text" in case:
        return case["text"]
    if case.get("no_study"):
        return None
    text = BASE_STUDY
    for old, new in case.get("replace", []):
        assert old in text, f"case {case['id']}: {old!r} is not in the base study"
        text = text.replace(old, new, 1)
    return text + case.get("append", "")


def _write_case(case: dict, folder: Path) -> dict[str, str]:
    """Write the case's files into ``folder``; return the placeholders for its argv."""
    for name, content in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content, encoding="utf-8")
    module = f"user_model_{uuid.uuid4().hex[:10]}"  # imported modules are cached per process
    if "module" in case:
        (folder / f"{module}.py").write_text(case["module"], encoding="utf-8")
    if "csv" in case:
        (folder / "cases.csv").write_text(case["csv"], encoding="utf-8")
    for name, content in case.get("files", {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content, encoding="utf-8")
    for name in case.get("dirs", []):
        (folder / name).mkdir(parents=True, exist_ok=True)
    text = _study_text(case)
    if text is not None:
        (folder / "case.toml").write_text(text.replace("{module}", module), encoding="utf-8")
    return {"study": "case.toml", "module": module, "cwd": str(folder)}


def _argv(case: dict, values: dict[str, str]) -> list[str]:
    return [arg.format(**values) for arg in case["argv"]]


def _run(argv: list[str]) -> int:
    from hsgd_tune.cli.main import main

    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own exits
        return exc.code if isinstance(exc.code, int) else 1


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c['category']}-{c['id']}") for c in CASES])
def test_hostile_input(case, workdir, capsys, monkeypatch, request):
    if case.get("existing"):
        template = request.getfixturevalue("finished_study")
        shutil.copytree(template, workdir, dirs_exist_ok=True)
        _drop_cached_stores()
    values = _write_case(case, workdir)
    for key, value in case.get("env", {}).items():
        monkeypatch.setenv(key, value)
    fault = FAULTS[case["fault"]] if "fault" in case else None
    with fault(workdir, monkeypatch) if fault else contextlib.nullcontext():
        before = _digest(workdir)
        code = _run(_argv(case, values))
        after = _digest(workdir)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == case["code"], f"exit {code}, expected {case['code']}; stderr:\n{err}"
    assert "Traceback" not in out + err, err
    assert len(lines) == 1 and lines[0].startswith(PREFIX), f"expected one error line, got:\n{err}"
    assert case["expect"] in lines[0], f"{case['expect']!r} not in {lines[0]!r}"
    for secret in case.get("secrets", []):
        assert secret not in out + err, f"the password {secret!r} was shown"
    if case.get("changes"):  # a fault case that is allowed to write: say what it must leave
        AFTER[case["changes"]](workdir)
    else:
        assert after == before, _difference(before, after)
    _drop_cached_stores()


def _difference(before: dict[str, str], after: dict[str, str]) -> str:
    created = sorted(set(after) - set(before))
    deleted = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"files created {created}, deleted {deleted}, changed {changed}"


def test_the_corpus_is_large_and_covers_every_category():
    """README, "Reliability": the count and the categories are stated there; keep them true."""
    categories = {c["category"] for c in CASES}
    assert {"study", "name", "csv", "entry-point", "url", "option", "fault"} <= categories
    assert len(CASES) >= 150, len(CASES)
    ids = [f"{c['category']}-{c['id']}" for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    readme = (HERE.parent.parent / "README.md").read_text(encoding="utf-8")
    assert f"{len(CASES)} hostile-input cases" in readme


if __name__ == "__main__":  # how many cases per category (for the README)
    from collections import Counter

    print(len(CASES), dict(Counter(c["category"] for c in CASES)), file=sys.stdout)
