"""Bad input through the CLI: one line naming the file, key, rule and value; exit 2; nothing created.

Each case writes a valid study (the quick-start with one short trial) with exactly one defect into an
empty working directory, runs ``hsgd-tune run`` on it, and checks that the user sees one clear line,
no traceback, and that no Optuna study and no MLflow experiment or run was created (``mlruns/`` stays
absent). Most cases call :func:`hsgd_tune.cli.main.main` in-process (a subprocess imports torch, Optuna
and MLflow: seconds each); a few go through the real console script.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hsgd_tune.cli.main import build_parser, main

QUICKSTART = Path(__file__).resolve().parent.parent / "studies" / "quickstart.toml"
NAME = "cli-errors"
PREFIX = "hsgd-tune: error: "


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"test setup: {old!r} not in the study text"
    return text.replace(old, new, 1)


def _base() -> str:
    """The quick-start, one trial of 50 steps: valid (see test_valid_bases_pass_every_check)."""
    text = QUICKSTART.read_text(encoding="utf-8")
    text = _replace(text, 'name = "quickstart"', f'name = "{NAME}"')
    text = _replace(text, "n_trials = 20", "n_trials = 1")
    return _replace(text, "steps = 1000", "steps = 50")


def _csv_base(csv: str = "data.csv", target: str = "y") -> str:
    """The base on a CSV source (written by :func:`_write_csv`): 20 training examples."""
    text = _replace(_base(), 'source = "digits"', f'source = "csv"\npath = "{csv}"\ntarget = "{target}"')
    for n in ("n_train", "n_reference", "n_val"):
        text = _replace(text, f"{n} = 500", f"{n} = 20")
    return _replace(text, "choices = [8, 16, 32, 64, 128]", "choices = [4, 8, 16]")


def _write_csv(folder: Path, name: str = "data.csv", bad_cell: str | None = None) -> None:
    rows = ["a,b,c,y"] + [f"{i * 0.1:.1f},{(i * 7) % 11},{i % 5 - 2},{i % 3}" for i in range(90)]
    if bad_cell is not None:
        a, _, c, y = rows[5].split(",")
        rows[5] = ",".join([a, bad_cell, c, y])
    (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")


def _entry_point_base(spec: str) -> str:
    return _replace(
        _base(), 'kind = "mlp"\nwidths = [64, 64]', f'kind = "entry_point"\nentry_point = "{spec}"'
    )


@dataclass(frozen=True)
class Case:
    """A study with one defect: ``write(folder) -> study text`` (None: no file), the key and value shown."""

    id: str
    write: Callable[[Path], str | None]
    key: str
    value: str
    args: tuple[str, ...] = ()
    marks: tuple = field(default=())

    def setup(self, folder: Path) -> tuple[str, list[str]]:
        """Write the case into ``folder``; return the study path as the user types it, and argv."""
        study = f"{self.id}.toml"
        text = self.write(folder)
        if text is not None:
            (folder / study).write_text(text, encoding="utf-8")
        return study, ["run", study, "--quiet", *self.args]


def _with_csv(text: str, **csv) -> Callable[[Path], str]:
    def write(folder: Path) -> str:
        _write_csv(folder, **csv)
        return text

    return write


def _factory_raising_two_lines(folder: Path) -> str:
    module = f"user_model_{uuid.uuid4().hex[:10]}"  # imported modules are cached per process
    (folder / f"{module}.py").write_text(
        "def build(n_features, n_outputs):\n    raise ValueError('first line\\nsecond line')\n",
        encoding="utf-8",
    )
    return _entry_point_base(f"{module}:build")


def _factory_returning_int(folder: Path) -> str:
    module = f"user_model_{uuid.uuid4().hex[:10]}"
    (folder / f"{module}.py").write_text(
        "def build(n_features, n_outputs):\n    return 3\n", encoding="utf-8"
    )
    return _entry_point_base(f"{module}:build")


CASES = [
    Case("missing-key", lambda d: _replace(_base(), "n_train = 500", ""), "data.n_train", "None"),
    Case("wrong-type", lambda d: _replace(_base(), "n_val = 500", 'n_val = "500"'), "data.n_val", "'500'"),
    Case("bool-as-int", lambda d: _replace(_base(), "seed = 0", "seed = true"), "seed", "True"),
    Case(
        "unknown-key",
        lambda d: _replace(_base(), "seed = 0", 'seed = 0\ncolour = "blue"'),
        "colour",
        "'blue'",
    ),
    Case(
        "unknown-nested-key",
        lambda d: _replace(_base(), "steps = 50", "steps = 50\nlr_decay = 0.5"),
        "training.lr_decay",
        "0.5",
    ),
    Case("negative-steps", lambda d: _replace(_base(), "steps = 50", "steps = -50"), "training.steps", "-50"),
    Case(
        "empty-range",
        lambda d: _replace(_replace(_base(), "low = 0.005", "low = 0.5"), "high = 0.5 ", "high = 0.005 "),
        "search.learning_rate.high",
        "0.005",
    ),
    Case(
        "delta-out-of-range", lambda d: _replace(_base(), "delta = 0.05", "delta = 1.5"), "bound.delta", "1.5"
    ),
    Case(
        "unknown-objective",
        lambda d: _replace(_base(), '"crossfit_loss", "risk_bound"', '"crossfit_loss", "accuracy"'),
        "objectives.minimize[1]",
        "'accuracy'",
    ),
    Case("missing-csv", lambda d: _csv_base(csv="absent.csv"), "data.path", "absent.csv'"),
    Case(
        "csv-without-target",
        _with_csv(_csv_base(target="label")),
        "data.target",
        "'label'",
    ),
    Case(
        "csv-non-numeric-feature",
        _with_csv(_csv_base(), bad_cell="abc"),
        "data.path",  # the column is named in the rule
        "'abc'",
    ),
    Case(
        "bad-entry-point",
        lambda d: _entry_point_base("no_such_module_hsgd:build"),
        "model.entry_point",
        "'no_such_module_hsgd:build'",
    ),
    Case(
        "entry-point-without-colon",
        lambda d: _entry_point_base("no_such_module_hsgd.build"),
        "model.entry_point",
        "'no_such_module_hsgd.build'",
    ),
    Case("factory-raises-two-lines", _factory_raising_two_lines, "model.entry_point", ":build'"),
    Case("factory-returns-no-module", _factory_returning_int, "model.entry_point", "'int'"),
    Case("toml-syntax-error", lambda d: _replace(_base(), "seed = 0", "seed = = 0"), "(syntax)", "line 4"),
    Case("missing-study-file", lambda d: None, "(file)", "'missing-study-file.toml'"),
    Case(
        "batch-larger-than-n_train",
        lambda d: _replace(_base(), "choices = [8, 16, 32, 64, 128]", "choices = [8, 1000]"),
        "search.batch_size",
        "1000",
    ),
    # δ is divided over the configuration grid, not over trials: a file of the older kind is refused.
    Case(
        "max-trials-of-an-older-file",
        lambda d: _replace(_base(), "loss_clip = 5.0", "loss_clip = 5.0\nmax_trials = 20"),
        "bound.max_trials",
        "20",
    ),
]


def _assert_nothing_created(folder: Path) -> None:
    mlruns = folder / "mlruns"
    assert not (mlruns / "optuna-journal.log").exists(), "an Optuna study was created"
    db = mlruns / "mlflow.db"
    if db.exists():
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{db}")
        experiment = client.get_experiment_by_name(f"hsgd-{NAME}")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        assert experiment is None, f"MLflow experiment hsgd-{NAME} was created ({len(runs)} runs)"
    assert not mlruns.exists(), f"bad input left {sorted(p.name for p in mlruns.rglob('*'))}"


def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith(PREFIX)
    return lines[0]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_study_gives_one_line_exit_2_and_creates_nothing(workdir, capsys, case):
    study, argv = case.setup(workdir)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    line = _one_line(err)
    assert f" {case.key}: " in line, line
    assert case.value in line.rsplit(", got ", 1)[1], line
    assert "Traceback" not in out + err and out == ""
    _assert_nothing_created(workdir)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_study_error_names_the_study_file(workdir, capsys, case):
    study, argv = case.setup(workdir)
    main(argv)
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"{PREFIX}{study}: "), line


def test_valid_bases_pass_every_check(workdir):
    """Each case's only defect is its own: the study files it starts from pass load and prepare."""
    from hsgd_tune.search.prepare import prepare
    from hsgd_tune.studyfile.config import load_study, with_run

    _write_csv(workdir)
    for name, text in [("base.toml", _base()), ("csv.toml", _csv_base())]:
        (workdir / name).write_text(text, encoding="utf-8")
        prepare(with_run(load_study(name)))
    _assert_nothing_created(workdir)


# ---------------------------------------------------------------------------------------------
# The real console script, for a few cases: exit status and no traceback at all
# ---------------------------------------------------------------------------------------------


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("hsgd-tune")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hsgd_tune.cli"]


def _run_cli(folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [*_console_script(), *argv], cwd=folder, env=env, capture_output=True, text=True, timeout=120
    )


SUBPROCESS_CASES = ["toml-syntax-error", "bad-entry-point", "missing-csv"]  # the last one loads data


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES if c.id in SUBPROCESS_CASES])
def test_console_script_on_bad_study(workdir, case):
    study, argv = case.setup(workdir)
    proc = _run_cli(workdir, argv)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith(f"{PREFIX}{study}: {case.key}: ") and case.value in line
    assert "Traceback" not in proc.stdout + proc.stderr and proc.stdout == ""
    _assert_nothing_created(workdir)


# ---------------------------------------------------------------------------------------------
# Options, help and rank
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (("--n-trials", "0"), "--n-trials"),
        (("--timeout", "0"), "--timeout"),
        (("--timeout", "nan"), "--timeout"),
    ],
)
def test_bad_run_option_gives_one_line_and_creates_nothing(workdir, capsys, args, key):
    (workdir / "base.toml").write_text(_base(), encoding="utf-8")
    assert main(["run", "base.toml", "--quiet", *args]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"{PREFIX}{key}: ") and line.endswith(
        f"got {float(args[1]) if key == '--timeout' else 0}"
    )
    _assert_nothing_created(workdir)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_help_lists_the_commands(workdir):
    proc = _run_cli(workdir, ["--help"])
    assert proc.returncode == 0 and proc.stderr == ""
    for word in (*_subcommands(), "MLFLOW_TRACKING_URI"):
        assert word in proc.stdout, word


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("run", ["STUDY.toml", "--n-trials", "--timeout", "--storage", "--quiet"]),
        ("rank", ["STUDY", "--storage"]),
    ],
)
def test_command_help_mentions_each_option(capsys, command, options):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    parser = _subcommands()[command]
    declared = [a.metavar or a.dest for a in parser._actions if not a.option_strings]
    declared += [a.option_strings[-1] for a in parser._actions if a.option_strings]
    for option in {*options, *declared}:
        assert option in out, option


def test_rank_of_an_unknown_study_gives_one_line(workdir, capsys):
    assert main(["rank", "no-such-study", "--no-mlflow"]) != 0
    line = _one_line(capsys.readouterr().err)
    assert "'no-such-study'" in line
    assert not (workdir / "mlruns" / "mlflow.db").exists()


def test_rank_of_an_unknown_study_creates_nothing(workdir, capsys):
    main(["rank", "no-such-study"])
    _assert_nothing_created(workdir)


def test_rank_of_a_missing_study_file_names_it(workdir, capsys):
    assert main(["rank", "absent.toml"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"{PREFIX}absent.toml: (file): ")
    _assert_nothing_created(workdir)


def test_unusable_storage_gives_one_line_and_creates_nothing(workdir, capsys):
    (workdir / "base.toml").write_text(_base(), encoding="utf-8")
    code = main(["run", "base.toml", "--quiet", "--storage", "nosuchdb://host/db"])
    err = capsys.readouterr().err
    assert code != 0
    _assert_nothing_created(workdir)
    line = _one_line(err)
    assert "nosuchdb://host/db" in line
