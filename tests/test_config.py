"""Tests for hsgd_tune.studyfile.config: the study file → frozen dataclasses, and every validation rule.

Each rule is shown by the smallest study that breaks it: a valid base document with one change. The
error must name the key (and, via ``load_study``, the file), the rule and the value.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest

from hsgd_tune.errors import ConfigError
from hsgd_tune.studyfile.config import Knob, load_study, parse_study, with_run

QUICKSTART = Path(__file__).resolve().parent.parent / "studies" / "quickstart.toml"

BASE = """
name = "t"

[data]
source = "digits"
n_train = 100
n_val = 100

[search.learning_rate]
low = 0.01
high = 0.1

[search.batch_size]
choices = [8, 16]
"""

DELETE = object()


def _doc(**changes: Any) -> dict[str, Any]:
    """The base document with dotted keys (``data__n_train`` → data.n_train) set or deleted."""
    doc = copy.deepcopy(tomllib.loads(BASE))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        table = doc
        for p in parents:
            table = table.setdefault(p, {})
        if value is DELETE:
            del table[leaf]
        else:
            table[leaf] = value
    return doc


def _parse(tmp_path: Path, **changes: Any):
    return parse_study(_doc(**changes), tmp_path)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# The quick-start file loads into the expected frozen dataclasses
# ---------------------------------------------------------------------------------------------


def test_quickstart_loads_with_its_values_and_the_defaults():
    cfg = load_study(QUICKSTART)
    assert cfg.name == "quickstart" and cfg.seed == 0 and cfg.device == "cpu"
    assert (cfg.data.source, cfg.data.n_train, cfg.data.n_reference, cfg.data.n_val) == (
        "digits",
        500,
        500,
        500,
    )
    assert (cfg.data.n_test, cfg.data.task, cfg.data.path, cfg.data.reference_as_validation) == (
        0,
        None,
        None,
        False,
    )
    assert cfg.model.kind == "mlp" and cfg.model.widths == (64, 64) and cfg.model.entry_point is None
    assert cfg.search.learning_rate == Knob(
        "learning_rate", "float", low=0.005, high=0.5, log=True, points_per_decade=10
    )
    assert cfg.search.batch_size == Knob("batch_size", "categorical", choices=(8, 16, 32, 64, 128))
    assert cfg.search.knobs == ()
    assert (cfg.training.steps, cfg.training.record_every, cfg.training.divergence_factor) == (
        1000,
        25,
        100.0,
    )
    assert (cfg.bound.delta, cfg.bound.loss_clip, cfg.bound.lipschitz_subsample) == (0.05, 5.0, 64)
    assert cfg.bound.grid_size is None and cfg.grid_size == 21 * 5  # δ is divided over Λ
    assert cfg.objectives == ("crossfit_loss", "risk_bound")
    assert cfg.sampler.kind == "tpe" and cfg.sampler.grid_points == 5
    assert cfg.run.n_trials == 20 and cfg.run.timeout is None and cfg.run.storage is None
    assert cfg.experiment_name == "hsgd-quickstart"
    assert cfg.source_file == QUICKSTART


def test_minimal_study_gets_every_default(tmp_path):
    cfg = _parse(tmp_path)
    assert cfg.data.n_reference is None and cfg.model.widths == (64, 64)
    assert cfg.training.steps == 1000 and cfg.training.record_every == 20
    assert cfg.bound.delta == 0.05 and cfg.objectives == ("crossfit_loss", "risk_bound")
    assert (cfg.rank.within, cfg.rank.tolerance, cfg.rank.standard_errors) == ("crossfit_loss", 0.0, 0.0)
    assert cfg.sampler.kind == "tpe" and cfg.run.n_trials == 20 and cfg.grid_size == 11 * 2


def test_config_is_frozen_and_hashable():
    cfg = load_study(QUICKSTART)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.n_train = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.search.learning_rate.low = 1.0  # type: ignore[misc]
    assert isinstance(cfg.model.widths, tuple)
    hash(cfg)  # tuples all the way down


def test_to_dict_is_json_able():
    d = load_study(QUICKSTART).to_dict()
    assert json.loads(json.dumps(d))["search"]["batch_size"]["choices"] == [8, 16, 32, 64, 128]


def test_int_where_a_float_is_expected_is_accepted_as_float(tmp_path):
    cfg = _parse(tmp_path, bound={"delta": 0.1, "loss_clip": 3})
    assert cfg.bound.loss_clip == 3.0 and isinstance(cfg.bound.loss_clip, float)


# ---------------------------------------------------------------------------------------------
# Every rule: the error names the key (and the value)
# ---------------------------------------------------------------------------------------------

SEARCH = {"learning_rate": {"low": 0.01, "high": 0.1}, "batch_size": {"choices": [8, 16]}}

RULES = [
    # missing keys and tables
    ("missing name", {"name": DELETE}, "name", None),
    ("missing [data]", {"data": DELETE}, "data", None),
    ("missing [search]", {"search": DELETE}, "search", None),
    ("missing data.n_train", {"data__n_train": DELETE}, "data.n_train", None),
    ("missing data.source", {"data__source": DELETE}, "data.source", None),
    ("missing learning_rate", {"search__learning_rate": DELETE}, "search.learning_rate", None),
    ("missing lr high", {"search__learning_rate__high": DELETE}, "search.learning_rate.high", None),
    # wrong types
    ("str for int", {"data__n_val": "100"}, "data.n_val", "'100'"),
    ("float for int", {"training": {"steps": 10.5}}, "training.steps", "10.5"),
    ("bool for int (seed)", {"seed": True}, "seed", "True"),
    ("bool for int (n_train)", {"data__n_train": True}, "data.n_train", "True"),
    ("bool for float", {"bound": {"delta": True}}, "bound.delta", "True"),
    ("str for float", {"bound": {"delta": "0.05"}}, "bound.delta", "'0.05'"),
    ("str for bool", {"data__reference_as_validation": "yes"}, "data.reference_as_validation", "'yes'"),
    ("str for list", {"objectives": {"minimize": "val_loss"}}, "objectives.minimize", "'val_loss'"),
    ("scalar for table", {"training": 5}, "training", "5"),
    ("nan", {"bound": {"loss_clip": math.nan}}, "bound.loss_clip", "nan"),
    ("inf", {"search__learning_rate__high": math.inf}, "search.learning_rate.high", "inf"),
    ("name with slash", {"name": "a/b"}, "name", "'a/b'"),
    ("empty name", {"name": "  "}, "name", None),
    # unknown keys, at the top and in nested tables
    ("unknown top-level key", {"colour": "blue"}, "colour", "'blue'"),
    ("misspelt section", {"trainig": {"steps": 10}}, "trainig", None),
    ("unknown in [data]", {"data__n_trian": 5}, "data.n_trian", "5"),
    ("unknown in [training]", {"training": {"lr_decay": 0.5}}, "training.lr_decay", "0.5"),
    ("unknown in a knob", {"search__learning_rate__step": 0.1}, "search.learning_rate.step", "0.1"),
    ("unknown in [search]", {"search__momentum": {"low": 0.1, "high": 0.9}}, "search.momentum", None),
    ("unknown in [run]", {"run": {"trials": 3}}, "run.trials", "3"),
    (
        "unknown in [data.synthetic]",
        {"data__source": "synthetic", "data__synthetic": {"depth": 3}},
        "data.synthetic.depth",
        "3",
    ),
    # one-of
    ("unknown data.source", {"data__source": "mnist"}, "data.source", "'mnist'"),
    ("unknown model.kind", {"model": {"kind": "rnn"}}, "model.kind", "'rnn'"),
    ("unknown sampler", {"sampler": {"kind": "bayes"}}, "sampler.kind", "'bayes'"),
    ("unknown device", {"device": "tpu"}, "device", "'tpu'"),
    ("unknown task", {"data__task": "ranking"}, "data.task", "'ranking'"),
    # positive numbers and consistency of [training]
    ("negative steps", {"training": {"steps": -5}}, "training.steps", "-5"),
    ("zero steps", {"training": {"steps": 0}}, "training.steps", "0"),
    ("zero n_train", {"data__n_train": 0}, "data.n_train", "0"),
    ("negative n_test", {"data__n_test": -1}, "data.n_test", "-1"),
    ("record_every > steps", {"training": {"steps": 10, "record_every": 20}}, "training.record_every", "20"),
    ("negative timeout", {"run": {"timeout": -1.0}}, "run.timeout", "-1.0"),
    # search ranges
    (
        "lr low = high",
        {"search__learning_rate": {"low": 0.1, "high": 0.1}},
        "search.learning_rate.high",
        "0.1",
    ),
    (
        "lr low > high",
        {"search__learning_rate": {"low": 0.5, "high": 0.1}},
        "search.learning_rate.high",
        "0.1",
    ),
    (
        "log range low = 0",
        {"search__learning_rate": {"low": 0.0, "high": 0.1}},
        "search.learning_rate.low",
        "0.0",
    ),
    (
        "linear lr range low < 0",
        {"search__learning_rate": {"low": -0.1, "high": 0.1, "log": False}},
        "search.learning_rate.low",
        "-0.1",
    ),
    (
        "log knob range low = 0",
        {"search__knobs": {"momentum": {"low": 0.0, "high": 0.9}}},
        "search.knobs.momentum.low",
        "0.0",
    ),
    (
        "lr choices not positive",
        {"search__learning_rate": {"choices": [0.1, 0]}},
        "search.learning_rate.choices",
        None,
    ),
    ("empty batch_size choices", {"search__batch_size": {"choices": []}}, "search.batch_size.choices", "[]"),
    (
        "float batch size choices",
        {"search__batch_size": {"choices": [8.0, 16.0]}},
        "search.batch_size",
        "8.0",
    ),
    (
        "float batch size range",
        {"search__batch_size": {"low": 8.0, "high": 64.0}},
        "search.batch_size.low",
        "8.0",
    ),
    (
        "float batch size type",
        {"search__batch_size": {"type": "float", "low": 8, "high": 64}},
        "search.batch_size",
        None,
    ),
    ("zero batch size", {"search__batch_size": {"choices": [0, 8]}}, "search.batch_size", "0"),
    ("bool batch size", {"search__batch_size": {"choices": [True, 8]}}, "search.batch_size", "True"),
    (
        "list as a choice",
        {"search__batch_size": {"choices": [[8], 16]}},
        "search.batch_size.choices[0]",
        "[8]",
    ),
    # objectives
    (
        "unknown objective",
        {"objectives": {"minimize": ["val_loss", "accuracy"]}},
        "objectives.minimize[1]",
        "'accuracy'",
    ),
    (
        "repeated objective",
        {"objectives": {"minimize": ["val_loss", "val_loss"]}},
        "objectives.minimize",
        "'val_loss'",
    ),
    ("no objective", {"objectives": {"minimize": []}}, "objectives.minimize", "[]"),
    # bound
    ("delta = 0", {"bound": {"delta": 0.0}}, "bound.delta", "0.0"),
    ("delta = 1", {"bound": {"delta": 1.0}}, "bound.delta", "1.0"),
    ("delta > 1", {"bound": {"delta": 1.5}}, "bound.delta", "1.5"),
    ("negative delta", {"bound": {"delta": -0.05}}, "bound.delta", "-0.05"),
    ("zero loss_clip", {"bound": {"loss_clip": 0.0}}, "bound.loss_clip", "0.0"),
    ("zero grid_size", {"bound": {"grid_size": 0}}, "bound.grid_size", "0"),
    # data sources
    ("csv without path", {"data__source": "csv", "data__target": "y"}, "data.path", "None"),
    ("csv without target", {"data__source": "csv", "data__path": "d.csv"}, "data.target", "None"),
    ("path with a non-csv source", {"data__path": "d.csv"}, "data.path", "'d.csv'"),
    ("target with a non-csv source", {"data__target": "y"}, "data.target", "'y'"),
    ("[data.synthetic] with digits", {"data__synthetic": {"n_features": 5}}, "data.synthetic", "'digits'"),
    ("regression on digits", {"data__task": "regression"}, "data.task", "'regression'"),
    (
        "synthetic with one class",
        {"data__source": "synthetic", "data__synthetic": {"n_classes": 1}},
        "data.synthetic.n_classes",
        "1",
    ),
    # model and knobs
    ("negative width", {"model": {"widths": [64, -1]}}, "model.widths[1]", "-1"),
    ("widths on a linear model", {"model": {"kind": "linear", "widths": [8]}}, "model.widths", "[8]"),
    (
        "knob for a built-in model",
        {"search__knobs": {"dropout": {"low": 0.1, "high": 0.5}}},
        "search.knobs.dropout",
        "'dropout'",
    ),
    ("entry_point kind without entry_point", {"model": {"kind": "entry_point"}}, "model.entry_point", "None"),
    ("entry_point with kind mlp", {"model": {"entry_point": "m:f"}}, "model.entry_point", "'m:f'"),
    (
        "entry point without colon",
        {"model": {"kind": "entry_point", "entry_point": "mymodule.build"}},
        "model.entry_point",
        "'mymodule.build'",
    ),
    (
        "entry point without function",
        {"model": {"kind": "entry_point", "entry_point": "mymodule:"}},
        "model.entry_point",
        "'mymodule:'",
    ),
    # the union over the configuration grid
    ("max_trials of an older study file", {"bound": {"max_trials": 20}}, "bound.max_trials", "20"),
    ("grid_size below the grid", {"bound": {"grid_size": 3}}, "bound.grid_size", "3"),
    (
        "zero points_per_decade",
        {"search__learning_rate__points_per_decade": 0},
        "search.learning_rate.points_per_decade",
        "0",
    ),
    (
        "points_per_decade on a linear range",
        {"search__knobs": {"momentum": {"low": 0.0, "high": 0.9, "log": False, "points_per_decade": 5}}},
        "search.knobs.momentum.points_per_decade",
        "5",
    ),
    (
        "one grid point",
        {"search__knobs": {"momentum": {"low": 0.0, "high": 0.9, "log": False, "grid_points": 1}}},
        "search.knobs.momentum.grid_points",
        "1",
    ),
]


@pytest.mark.parametrize(("changes", "key", "value"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_each_rule_names_its_key_and_value(tmp_path, changes, key, value):
    with pytest.raises(ConfigError) as info:
        _parse(tmp_path, **changes)
    err = info.value
    assert err.key == key, str(err)
    message = str(err)
    assert message.startswith(f"{key}: ") and ", got " in message
    assert "\n" not in message
    if value is not None:
        assert value in message.rsplit(", got ", 1)[1], message


def test_base_document_of_the_rule_table_is_valid(tmp_path):
    """Each case above breaks exactly one rule of a study that is otherwise accepted."""
    _parse(tmp_path)
    _parse(tmp_path, run={"n_trials": 20}, bound={"grid_size": 10**6})
    _parse(tmp_path, search__knobs={"momentum": {"low": 0.0, "high": 0.9, "log": False}})


# ---------------------------------------------------------------------------------------------
# load_study: the file is named in every error
# ---------------------------------------------------------------------------------------------


def test_load_study_names_the_file_in_a_rule_error(tmp_path):
    path = _write(tmp_path / "bad.toml", BASE + "\n[training]\nsteps = -3\n")
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert info.value.file == path
    assert str(info.value) == f"{path}: training.steps: must be positive, got -3"


def test_load_study_reports_toml_syntax_errors_with_the_line(tmp_path):
    path = _write(tmp_path / "bad.toml", BASE.replace("n_val = 100", "n_val = = 100"))
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert info.value.file == path and info.value.key == "(syntax)"
    assert "line 7" in str(info.value) and "\n" not in str(info.value)


def test_load_study_reports_a_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="study file must exist") as info:
        load_study(path)
    assert info.value.file == path


def test_load_study_reports_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(BASE.replace('"t"', '"caf\xe9"').encode("latin-1"))
    with pytest.raises(ConfigError, match="readable UTF-8") as info:
        load_study(path)
    assert info.value.file == path


def test_csv_path_resolves_against_the_study_folder(workdir):
    path = _write(
        workdir / "sub" / "s.toml",
        BASE.replace('source = "digits"', 'source = "csv"\npath = "d.csv"\ntarget = "y"'),
    )
    assert load_study(path).data.path == (workdir / "sub" / "d.csv").resolve()


# ---------------------------------------------------------------------------------------------
# fingerprint and with_run
# ---------------------------------------------------------------------------------------------


def test_fingerprint_ignores_run_and_the_file(tmp_path):
    fp = _parse(tmp_path).fingerprint()
    assert (
        _parse(
            tmp_path, run={"n_trials": 5, "timeout": 60.0, "storage": "x.log", "experiment": "e"}
        ).fingerprint()
        == fp
    )
    assert dataclasses.replace(_parse(tmp_path), source_file=Path("elsewhere.toml")).fingerprint() == fp


@pytest.mark.parametrize(
    "changes",
    [
        {"search__learning_rate__high": 0.2},
        {"search__batch_size": {"choices": [8, 32]}},
        {"search__knobs": {"momentum": {"low": 0.1, "high": 0.9}}},
        {"training": {"steps": 500}},
        {"bound": {"delta": 0.1}},
        {"seed": 1},
        {"data__n_train": 200},
        {"objectives": {"minimize": ["val_loss"]}},
        {"sampler": {"kind": "random"}},
        {"search__learning_rate__points_per_decade": 5},
        {"bound": {"grid_size": 1000}},
    ],
    ids=lambda c: next(iter(c)),
)
def test_fingerprint_changes_with_what_determines_results(tmp_path, changes):
    assert _parse(tmp_path, **changes).fingerprint() != _parse(tmp_path).fingerprint()


def test_with_run_overrides_run_and_keeps_the_grid(tmp_path):
    cfg = _parse(tmp_path, run={"n_trials": 20})
    smaller = with_run(cfg, n_trials=5, timeout=30.0, storage=None)
    assert smaller.run.n_trials == 5 and smaller.run.timeout == 30.0 and smaller.run.storage is None
    assert smaller.grid_size == cfg.grid_size and smaller.fingerprint() == cfg.fingerprint()
    assert with_run(cfg) == cfg


def test_with_run_accepts_any_budget_since_delta_is_divided_over_the_grid_not_the_trials(tmp_path):
    cfg = _parse(tmp_path, run={"n_trials": 10})
    assert with_run(cfg, n_trials=1000).run.n_trials == 1000


# ---------------------------------------------------------------------------------------------
# User entry points
# ---------------------------------------------------------------------------------------------

MODEL_MODULE = """
from torch import nn


def build(n_features, n_outputs, hidden=8):
    return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, n_outputs))


NOT_CALLABLE = 3
"""


def _entry_point_study(folder: Path, spec: str, module_text: str | None = MODEL_MODULE) -> Path:
    module = spec.partition(":")[0]
    if module_text is not None:
        _write(folder / f"{module}.py", module_text)
    text = BASE + f'\n[model]\nkind = "entry_point"\nentry_point = "{spec}"\n'
    text += '\n[search.knobs.hidden]\ntype = "int"\nlow = 4\nhigh = 16\n'
    return _write(folder / "study.toml", text)


def _unique_module() -> str:
    return f"user_model_{uuid.uuid4().hex[:10]}"  # imported modules are cached per process


def test_entry_point_resolves_next_to_the_study_file_and_builds_a_module(workdir):
    import torch

    from hsgd_tune.train.models import build_model, model_spec

    module = _unique_module()
    path = _entry_point_study(workdir / "elsewhere", f"{module}:build")
    cfg = load_study(path)  # the working directory is not the study's folder
    assert cfg.model.entry_point == f"{module}:build"
    assert [k.name for k in cfg.search.knobs] == ["hidden"] and cfg.search.knobs[0].kind == "int"
    model = build_model(model_spec(cfg.model, 5, 3, {"hidden": 7}))
    assert isinstance(model, torch.nn.Module)
    assert model[0].out_features == 7
    assert model(torch.zeros(2, 5)).shape == (2, 3)


@pytest.mark.parametrize(
    ("attr", "module_text", "rule"),
    [
        ("build", None, "module must import"),
        ("build", "raise RuntimeError('boom')\n", "module must import (boom)"),
        ("missing", MODEL_MODULE, "must name a callable"),
        ("NOT_CALLABLE", MODEL_MODULE, "must name a callable"),
    ],
    ids=["no module", "module raises", "no such function", "not callable"],
)
def test_entry_point_that_cannot_be_used_fails_at_load(workdir, attr, module_text, rule):
    spec = f"{_unique_module()}:{attr}"
    path = _entry_point_study(workdir, spec, module_text)
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert info.value.key == "model.entry_point" and info.value.value == spec
    assert rule in str(info.value) and str(info.value).startswith(f"{path}: ")


def test_diagnostics_trials_default_recommended_and_certificate_objective_forces_every_trial(tmp_path):
    base = {
        "name": "d",
        "data": {"source": "digits", "n_train": 100, "n_val": 50},
        "model": {"kind": "linear"},
        "search": {"learning_rate": {"low": 0.01, "high": 0.1}, "batch_size": {"choices": [16]}},
    }
    cfg = parse_study(base, tmp_path)
    assert cfg.diagnostics.trials == "recommended" and not cfg.diagnose_every_trial
    assert parse_study({**base, "diagnostics": {"trials": "all"}}, tmp_path).diagnose_every_trial
    assert not parse_study({**base, "diagnostics": {"trials": "front"}}, tmp_path).diagnose_every_trial
    forced = parse_study({**base, "objectives": {"minimize": ["val_loss", "certificate"]}}, tmp_path)
    assert forced.diagnostics.trials == "recommended" and forced.diagnose_every_trial
    # Which trials are diagnosed changes no objective: a study may switch it between resumes.
    assert (
        parse_study({**base, "diagnostics": {"trials": "none"}}, tmp_path).fingerprint() == cfg.fingerprint()
    )
    with pytest.raises(ConfigError, match=r"diagnostics\.trials"):
        parse_study({**base, "diagnostics": {"trials": "pareto"}}, tmp_path)
