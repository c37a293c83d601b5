"""A resolved config written back as a study file: the inverse of ``config.load_study``.

Used to export a picked trial as a standalone training config (``pick``), and to rebuild the config a
study stored when it was created (``StudyConfig.to_dict()`` as JSON). The exported file is a plain
study file whose search space has one value per knob (``choices = [value]``), so the project's own
loader reads it back and ``hsgd-tune train`` (or ``run``) trains exactly that configuration.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hsgd_tune.studyfile.config import StudyConfig, parse_study

#: Top-level keys that are plain values in the study file (everything else is a table).
_TOP_VALUES = ("name", "seed", "device")


def study_file_dict(config: dict[str, Any], fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The study-file layout (TOML document as dicts) of ``StudyConfig.to_dict()`` output.

    ``fixed`` maps knob names to values: the search space then holds just those values. Unknown
    sections are copied as tables, minus ``None`` values (TOML has no null; None means "default").
    """
    doc: dict[str, Any] = {k: config[k] for k in _TOP_VALUES if k in config}
    for key, value in config.items():
        if key in (*_TOP_VALUES, "source_file"):
            continue
        if key == "search":
            doc["search"] = _search_table(value, fixed or {})
        elif key == "objectives":
            doc["objectives"] = {"minimize": list(value)}
        else:
            doc[key] = _drop_none(value)
    data = doc.get("data", {})
    if data.get("source") != "synthetic":
        data.pop("synthetic", None)  # only allowed for synthetic data
    if data.get("n_reference") is None:
        data.pop("n_reference", None)
    return doc


def _search_table(search: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    knobs = [search["learning_rate"], search["batch_size"], *search.get("knobs", [])]
    table: dict[str, Any] = {}
    for knob in knobs:
        name = knob["name"]
        if name in fixed:
            entry = {"choices": [fixed[name]]}
        elif knob["kind"] == "categorical":
            entry = {"choices": list(knob["choices"])}
        else:
            entry = {"type": knob["kind"], "low": knob["low"], "high": knob["high"], "log": knob["log"]}
            entry |= {k: knob[k] for k in ("points_per_decade", "grid_points") if knob.get(k) is not None}
        if name in ("learning_rate", "batch_size"):
            table[name] = entry
        else:
            table.setdefault("knobs", {})[name] = entry
    return table


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def config_from_dict(config: dict[str, Any], base_dir: Path | None = None) -> StudyConfig:
    """A StudyConfig from ``StudyConfig.to_dict()`` output, validated like a study file."""
    return parse_study(study_file_dict(config), base_dir or Path.cwd())


# ---------------------------------------------------------------------------------------------
# A small TOML writer for the values a study file holds (the stdlib reads TOML but cannot write it)
# ---------------------------------------------------------------------------------------------


def dumps_toml(doc: dict[str, Any]) -> str:
    """TOML text for ``doc``: plain values first, then one ``[table]`` header per nested table.

    Values: str, bool, int, float, lists of these, and dicts inside lists (as inline tables).
    ``tomllib.loads(dumps_toml(doc)) == doc`` for such documents.
    """
    lines: list[str] = []
    _write_table(doc, [], lines)
    return "\n".join(lines).strip() + "\n"


def _write_table(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    values = {k: v for k, v in table.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and (values or not tables):
        lines += ["", f"[{'.'.join(_key(p) for p in path)}]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in values.items()]
    for key, sub in tables.items():
        _write_table(sub, [*path, key], lines)


def _key(key: str) -> str:
    bare = key and all(c.isalnum() or c in "_-" for c in key) and key.isascii()
    return key if bare else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest text that reads back to the same float
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")
