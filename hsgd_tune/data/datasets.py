"""Datasets and the S/H/V(/T) splits (DESIGN.md §1).

``load_dataset(cfg, seed)`` turns the study's ``[data]`` section into a :class:`Dataset`:

* ``train`` (S): the examples SGD trains on; the bound is about this split.
* ``reference`` (H): an independent split of the same size where the data allow; the reference
  ("expected") dynamics run on it, so nothing computed from H may depend on S.
* ``val`` (V): validation; it *is* ``reference`` when ``reference_as_validation`` is set.
* ``test`` (T): benchmarks only, present when ``n_test > 0``.

Sources: the scikit-learn bundled datasets (digits, breast_cancer, wine; no download), a synthetic
generator with unlimited rows, and a user CSV read with pandas. Every expected failure is a
:class:`~hsgd_tune.errors.DataError` naming the key, the rule and the value (and the CSV file when
the problem is in its content).

``cfg`` is duck-typed: any object with the attributes of ``config.DataConfig`` (and
``cfg.synthetic`` with those of ``config.SyntheticConfig``) will do.
"""

from __future__ import annotations

import csv
import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hsgd_tune.errors import DataError

__all__ = [
    "BUILTIN_SOURCES",
    "SOURCES",
    "DataWarning",
    "Dataset",
    "Split",
    "load_dataset",
    "split_indices",
]

BUILTIN_SOURCES = ("digits", "breast_cancer", "wine")
SOURCES = (*BUILTIN_SOURCES, "synthetic", "csv")
TASKS = ("classification", "regression")
SYNTHETIC_KINDS = ("teacher", "mixture")

# CSV task inference: a non-float target with at most this many distinct values is a class label.
MAX_INFERRED_CLASSES = 50
# A split feature column (or regression target) whose std on H is below this is left unscaled.
_MIN_STD = 1e-8
# Synthetic rows are generated in fixed-size blocks, each from its own seed, so row i of a split
# does not depend on how many rows are asked for (a larger request extends a smaller one).
_BLOCK_ROWS = 1024
# Rows drawn once from the teacher's own stream to centre (and, for regression, scale) its output.
_CALIBRATION_ROWS = 4096
# Spawn keys of the synthetic streams: the generator's parameters, then one stream per split role.
_PARAMS_STREAM = 0
_ROLE_STREAMS = {"train": 1, "reference": 2, "val": 3, "test": 4}


class DataWarning(UserWarning):
    """The data could be used, but not quite as asked (e.g. H is smaller than requested)."""


@dataclass(frozen=True, eq=False)
class Split:
    """One split: ``x`` is (n, d) float32; ``y`` is (n,) int64 labels 0..k-1 or float32 targets.

    ``eq=False``: splits hold arrays, so ``==`` is identity (array equality has no single truth
    value); compare contents with ``np.array_equal``.
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True, eq=False)
class Dataset:
    """The splits of one study plus what a model needs to know about them.

    Features (and regression targets) are standardized with H's statistics; ``x_mean``/``x_scale``
    and ``y_mean``/``y_scale`` are those statistics, so raw inputs can be mapped the same way
    (``(x_raw - x_mean) / x_scale``) and predictions mapped back (``y * y_scale + y_mean``).
    """

    train: Split
    reference: Split
    val: Split
    test: Split | None
    task: str
    n_features: int
    n_outputs: int
    description: str
    feature_names: tuple[str, ...] = ()
    classes: tuple[Any, ...] = ()  # original label of each class index (classification only)
    x_mean: np.ndarray | None = None
    x_scale: np.ndarray | None = None
    y_mean: float = 0.0
    y_scale: float = 1.0

    def preprocessing(self) -> dict[str, Any]:
        """What a served model needs to take raw rows and give answers in the data's own terms (JSON
        types): the feature names in column order, H's means and scales, the task, the original
        label of each class index, and the regression target's mean and scale."""
        return {
            "task": self.task,
            "feature_names": list(self.feature_names),
            "x_mean": [float(v) for v in self.x_mean],
            "x_scale": [float(v) for v in self.x_scale],
            "classes": list(self.classes),
            "y_mean": float(self.y_mean),
            "y_scale": float(self.y_scale),
        }


# --------------------------------------------------------------------------------------------
# entry point


def load_dataset(cfg: Any, seed: int) -> Dataset:
    """Load ``cfg.source``, draw the S/H/V(/T) splits from ``seed`` and standardize with H."""
    _check_seed(seed)
    source = cfg.source
    if source not in SOURCES:
        raise DataError("data.source", f"must be one of {', '.join(SOURCES)}", source)
    task = cfg.task
    if task is not None and task not in TASKS:
        raise DataError("data.task", "must be 'classification' or 'regression'", task)

    if source == "synthetic":
        return _load_synthetic(cfg, seed, task or "classification")

    table = _read_csv(cfg, task, seed) if source == "csv" else _read_builtin(source, task)

    idx = split_indices(table.n_rows, cfg, seed, what=table.name)
    raw = {role: (table.x[i], table.y[i]) for role, i in idx.items() if i is not None}
    return _assemble(raw, cfg, table.task, table.n_outputs, table.description, table)


def split_indices(n_rows: int, cfg: Any, seed: int, what: str = "the data") -> dict:
    """Row indices of each split, drawn once from a permutation seeded by ``seed``.

    Returns ``{"train", "reference", "val", "test"}`` → int64 index arrays, disjoint, with
    ``"val"`` the very same array as ``"reference"`` when ``cfg.reference_as_validation`` and
    ``"test"`` None when ``cfg.n_test`` is 0. S, V and T get their requested sizes; H gets
    ``n_reference`` (default ``n_train``) rows, or what is left with a :class:`DataWarning` when
    that is fewer, but never fewer than ``min(n_train, 10)`` (a :class:`DataError` instead).
    """
    _check_seed(seed)
    n_train, n_val, n_test, n_ref = _sizes(cfg)
    share = bool(cfg.reference_as_validation)
    n_val_drawn = 0 if share else n_val
    need = n_train + n_val_drawn + n_test
    min_ref = min(n_train, 10)
    if need + min_ref > n_rows:
        parts = ["n_train"] + ([] if share else ["n_val"]) + (["n_test"] if n_test else [])
        values = [n_train] + ([] if share else [n_val]) + ([n_test] if n_test else [])
        raise DataError(
            "data.n_train",
            f"{' + '.join(parts)} ({' + '.join(map(str, values))}) plus at least {min_ref} "
            f"reference rows must fit in the {n_rows} rows of {what}",
            n_train,
        )
    left = n_rows - need
    if n_ref > left:
        smaller = f", smaller than S ({n_train} rows)" if left < n_train else ""
        warnings.warn(
            f"data.n_reference: only {left} of the {n_rows} rows of {what} are left for the "
            f"reference split H after S, V and T; H has {left} rows instead of {n_ref}{smaller}",
            DataWarning,
            stacklevel=3,
        )
        n_ref = left

    perm = np.random.default_rng(seed).permutation(n_rows).astype(np.int64)
    bounds = np.cumsum([0, n_train, n_val_drawn, n_test, n_ref])
    train, val, test, ref = (perm[a:b] for a, b in itertools.pairwise(bounds))
    return {
        "train": train,
        "reference": ref,
        "val": ref if share else val,
        "test": test if n_test > 0 else None,
    }


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError("seed", "must be a non-negative integer", seed)


def _check_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(key, f"must be an integer >= {minimum}", value)
    return int(value)


def _sizes(cfg: Any) -> tuple[int, int, int, int]:
    n_train = _check_int("data.n_train", cfg.n_train, 1)
    # With reference_as_validation V is H, and n_val is ignored.
    n_val = 0 if cfg.reference_as_validation else _check_int("data.n_val", cfg.n_val, 1)
    n_test = _check_int("data.n_test", cfg.n_test, 0)
    n_ref = n_train if cfg.n_reference is None else _check_int("data.n_reference", cfg.n_reference, 1)
    return n_train, n_val, n_test, n_ref


# --------------------------------------------------------------------------------------------
# tables: built-ins and CSV


@dataclass(frozen=True, eq=False)
class _Table:
    name: str
    x: np.ndarray  # (n, d) float64
    y: np.ndarray  # (n,) int64 or float64
    task: str
    n_outputs: int
    feature_names: tuple[str, ...]
    classes: tuple[Any, ...]

    @property
    def n_rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def description(self) -> str:
        what = f"{self.n_outputs} classes" if self.task == "classification" else "regression"
        return f"{self.name} ({self.n_rows} rows, {self.x.shape[1]} features, {what})"


def _read_builtin(source: str, task: str | None) -> _Table:
    from sklearn import datasets

    if task == "regression":
        raise DataError("data.task", f"{source} is a classification dataset", task)
    loader = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
    }[source]
    bunch = loader()
    y = np.asarray(bunch.target, dtype=np.int64)
    classes = tuple(v.item() if hasattr(v, "item") else v for v in bunch.target_names)
    return _Table(
        name=source,
        x=np.asarray(bunch.data, dtype=np.float64),
        y=y,
        task="classification",
        n_outputs=len(classes),
        feature_names=tuple(str(f) for f in bunch.feature_names),
        classes=classes,
    )


def _short_list(names: list[Any], limit: int = 8) -> str:
    shown = ", ".join(repr(str(n)) for n in names[:limit])
    more = len(names) - limit
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _read_csv(cfg: Any, task: str | None, seed: int = 0) -> _Table:
    if cfg.path is None:
        raise DataError("data.path", "a csv source needs a path", None)
    path = Path(cfg.path)
    if not path.is_file():
        rule = "must be a file, not a directory" if path.is_dir() else "file must exist"
        raise DataError("data.path", rule, str(path))
    target = cfg.target
    if target is None:
        raise DataError("data.target", "a csv source needs a target column", None)

    try:
        frame = pd.read_csv(path, low_memory=False)
    except pd.errors.EmptyDataError:
        raise DataError("data.path", "CSV file is empty", str(path), file=path) from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DataError("data.path", f"CSV file cannot be read ({reason})", str(path), file=path) from None

    _check_unique_header(path, target)
    columns = list(frame.columns)
    if target not in columns:
        raise DataError(
            "data.target",
            f"must be a column of the CSV (columns: {_short_list(columns)})",
            target,
            file=path,
        )
    if len(frame) == 0:
        raise DataError("data.path", "CSV file has a header but no data rows", str(path), file=path)
    features = [c for c in columns if c != target]
    if not features:
        raise DataError(
            "data.path",
            f"CSV needs at least one feature column besides the target {target!r}",
            str(path),
            file=path,
        )

    # Missing values first (pandas reads an empty cell as NaN, which would also look non-numeric).
    for col in columns:
        missing = frame[col].isna().to_numpy()
        if missing.any():
            row = int(np.argmax(missing))
            raise DataError(
                "data.path",
                f"column {str(col)!r} must have no missing values "
                f"({int(missing.sum())} missing, first at data row {row + 1})",
                frame[col].iloc[row],
                file=path,
            )

    for col in features:
        series = frame[col]
        if not pd.api.types.is_numeric_dtype(series):
            row, value = _first_non_numeric(series)
            raise DataError(
                "data.path",
                f"feature column {str(col)!r} must be numeric (data row {row + 1})",
                value,
                file=path,
            )
    x = frame[features].to_numpy(dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        row, j = (int(v) for v in np.argwhere(~finite)[0])
        raise DataError(
            "data.path",
            f"feature column {str(features[j])!r} must be finite (data row {row + 1})",
            float(x[row, j]),
            file=path,
        )

    y_series = frame[target]
    # The task and the class set come from the study file or from the rows outside S (H, V, T and
    # unused rows): inferred from every row, the model's outputs (so the reference run) would depend
    # on S.
    outside_s = y_series.drop(index=y_series.index[_train_rows(len(frame), cfg, seed, path.name)])
    if task is None:
        task = _infer_task(outside_s)
    name = path.name
    if task == "classification":
        y, classes = _encode_labels(y_series, _encode_labels(outside_s)[1], target)
        if len(classes) < 2:
            raise DataError(
                "data.target",
                f"classification needs at least 2 distinct values in column {target!r}",
                classes[0] if classes else None,
                file=path,
            )
        n_outputs = len(classes)
    else:
        if not pd.api.types.is_numeric_dtype(y_series):
            row, value = _first_non_numeric(y_series)
            hint = " (set data.task = 'classification' to treat its values as classes)"
            raise DataError(
                "data.target",
                f"regression needs a numeric target; column {target!r} is not numeric "
                f"(data row {row + 1}){hint}",
                value,
                file=path,
            )
        y = y_series.to_numpy(dtype=np.float64)
        if not np.isfinite(y).all():
            row = int(np.argmax(~np.isfinite(y)))
            raise DataError(
                "data.target",
                f"regression target {target!r} must be finite (data row {row + 1})",
                float(y[row]),
                file=path,
            )
        classes, n_outputs = (), 1
    return _Table(
        name=name,
        x=x,
        y=y,
        task=task,
        n_outputs=n_outputs,
        feature_names=tuple(str(c) for c in features),
        classes=classes,
    )


def _check_unique_header(path: Path, target: str) -> None:
    """pandas renames a repeated column ``a`` to ``a.1``: a repeated target would silently become a
    feature, so a repeated name is an error, named."""
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        header = next(csv.reader(handle), [])
    seen, repeated = set(), []
    for name in header:
        if name in seen and name not in repeated:
            repeated.append(name)
        seen.add(name)
    if repeated:
        what = "the target column" if target in repeated else "column names"
        rule = f"CSV header must not repeat {what} (repeated: {_short_list(repeated)})"
        raise DataError("data.path", rule, str(path), file=path)


def _first_non_numeric(series: pd.Series) -> tuple[int, Any]:
    converted = pd.to_numeric(series, errors="coerce")
    bad = (converted.isna() & series.notna()).to_numpy()
    row = int(np.argmax(bad)) if bad.any() else 0
    value = series.iloc[row]
    return row, value.item() if hasattr(value, "item") else value


def _infer_task(y: pd.Series) -> str:
    """Classification if the target is non-float (object/bool/int) with few distinct values."""
    if pd.api.types.is_float_dtype(y):
        return "regression"
    return "classification" if y.nunique() <= MAX_INFERRED_CLASSES else "regression"


def _train_rows(n_rows: int, cfg: Any, seed: int, what: str) -> np.ndarray:
    """The rows of S, drawn as :func:`load_dataset` draws them (its warnings and errors are its to
    give: the table's own errors come first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        try:
            return split_indices(n_rows, cfg, seed, what)["train"]
        except DataError:
            return np.zeros(0, dtype=np.int64)


def _encode_labels(
    y: pd.Series, classes: tuple[Any, ...] | None = None, target: str = ""
) -> tuple[np.ndarray, tuple[Any, ...]]:
    """Labels → 0..k-1 in the sorted order of the distinct values (or of ``classes``, when given:
    a label outside them is an error naming its row)."""
    if classes is None:
        distinct = [v.item() if hasattr(v, "item") else v for v in pd.unique(y)]
        try:
            classes = tuple(sorted(distinct))
        except TypeError:  # mixed types: order by their text
            classes = tuple(sorted(distinct, key=str))
    code = {v: i for i, v in enumerate(classes)}
    values = [v.item() if hasattr(v, "item") else v for v in y]
    unseen = [row for row, v in enumerate(values) if v not in code]
    if unseen:
        raise DataError(
            "data.target",
            f"column {target!r} has a class that only the training split S holds (data row "
            f"{unseen[0] + 1}; the other rows hold {_short_list(list(classes))}); the classes are read "
            "from the rows outside S so that the reference run does not depend on S",
            values[unseen[0]],
        )
    return np.fromiter((code[v] for v in values), np.int64, len(values)), classes


# --------------------------------------------------------------------------------------------
# synthetic data


def _load_synthetic(cfg: Any, seed: int, task: str) -> Dataset:
    syn = cfg.synthetic
    kind = syn.kind
    if kind not in SYNTHETIC_KINDS:
        raise DataError("data.synthetic.kind", "must be 'teacher' or 'mixture'", kind)
    d = _check_int("data.synthetic.n_features", syn.n_features, 1)
    k = _check_int("data.synthetic.n_classes", syn.n_classes, 2)
    hidden = _check_int("data.synthetic.hidden", syn.hidden, 1)
    noise = syn.noise
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise DataError("data.synthetic.noise", "must be a number >= 0", noise)
    noise = float(noise)
    if kind == "teacher" and task == "classification" and noise > 1:
        raise DataError(
            "data.synthetic.noise",
            "is a label-noise probability here, so must be <= 1",
            noise,
        )
    n_train, n_val, n_test, n_ref = _sizes(cfg)
    share = bool(cfg.reference_as_validation)

    gen = _SyntheticGenerator(kind, task, seed, d, k, hidden, noise)
    wanted = {
        "train": n_train,
        "reference": n_ref,
        "val": 0 if share else n_val,
        "test": n_test,
    }
    raw = {role: gen.rows(role, n) for role, n in wanted.items() if n > 0}
    if share:
        raw["val"] = raw["reference"]

    n_outputs = k if task == "classification" else 1
    what = f"{k} classes" if task == "classification" else "regression"
    description = f"synthetic {kind} ({d} features, {what}, noise {noise:g}, seed {seed})"
    info = _Table(
        name="synthetic",
        x=np.empty((0, d)),
        y=np.empty(0),
        task=task,
        n_outputs=n_outputs,
        feature_names=tuple(f"x{j}" for j in range(d)),
        classes=tuple(range(k)) if task == "classification" else (),
    )
    return _assemble(raw, cfg, task, n_outputs, description, info)


class _SyntheticGenerator:
    """Unlimited i.i.d. rows; parameters fixed by the seed, independent of any row count.

    Each split role has its own stream (so S does not change when n_val or n_test does, and the
    splits are independent draws), cut into fixed blocks of ``_BLOCK_ROWS`` rows, each block
    seeded by (seed, role, block index): the first m rows of a request are the same for any
    request of at least m rows.

    * teacher: x ~ N(0, I_d); a random 1-hidden-layer tanh network gives k logits, centred on a
      calibration sample so classes are roughly balanced; label = argmax, replaced with
      probability ``noise`` by a uniformly random class. Regression: its single output, scaled
      to mean 0 and std 1 on the calibration sample, plus N(0, noise²).
    * mixture: k cluster means ~ N(0, I_d); a row picks a cluster uniformly and adds
      N(0, noise² I_d) (``noise`` is the cluster std relative to the spread of the means).
      Classification: label = cluster. Regression: a random linear function of x (scaled to
      std 1 on a calibration sample) plus N(0, noise²).
    """

    def __init__(self, kind: str, task: str, seed: int, d: int, k: int, hidden: int, noise: float) -> None:
        self.kind, self.task, self.seed = kind, task, seed
        self.d, self.k, self.noise = d, k, noise
        rng = self._rng(_PARAMS_STREAM)
        n_out = k if task == "classification" else 1
        if kind == "teacher":
            self.w1 = rng.standard_normal((d, hidden)) / np.sqrt(d)
            self.b1 = 0.5 * rng.standard_normal(hidden)
            self.w2 = rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)
            calib = self._teacher_out(rng.standard_normal((_CALIBRATION_ROWS, d)))
        else:
            self.means = rng.standard_normal((k, d))
            self.beta = rng.standard_normal((d, 1)) / np.sqrt(d)
            cluster = rng.integers(k, size=_CALIBRATION_ROWS)
            x = self.means[cluster] + noise * rng.standard_normal((_CALIBRATION_ROWS, d))
            calib = x @ self.beta
        self.shift = calib.mean(axis=0)
        std = float(calib.std()) if task == "regression" else 1.0
        self.scale = std if std > _MIN_STD else 1.0

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=key))

    def _teacher_out(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ self.w1 + self.b1) @ self.w2

    def rows(self, role: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        blocks = [self._block(role, b) for b in range(-(-n // _BLOCK_ROWS))]
        x = np.concatenate([b[0] for b in blocks])[:n]
        y = np.concatenate([b[1] for b in blocks])[:n]
        return x, y

    def _block(self, role: str, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = self._rng(_ROLE_STREAMS[role], index)
        m, d, k = _BLOCK_ROWS, self.d, self.k
        # Every draw is made for the whole block whatever the task, in a fixed order.
        if self.kind == "teacher":
            x = rng.standard_normal((m, d))
            out = (self._teacher_out(x) - self.shift) / self.scale
            cluster = None
        else:
            cluster = rng.integers(k, size=m)
            x = self.means[cluster] + self.noise * rng.standard_normal((m, d))
            out = (x @ self.beta - self.shift) / self.scale
        flip = rng.random(m)
        random_label = rng.integers(k, size=m)
        eps = rng.standard_normal(m)
        if self.task == "regression":
            return x, out[:, 0] + self.noise * eps
        if self.kind == "mixture":
            return x, cluster.astype(np.int64)
        label = np.argmax(out, axis=1)
        label = np.where(flip < self.noise, random_label, label)
        return x, label.astype(np.int64)


# --------------------------------------------------------------------------------------------
# standardization and assembly


def _assemble(raw: dict, cfg: Any, task: str, n_outputs: int, description: str, table: _Table) -> Dataset:
    # Standardize with H's statistics, not S's (nor S∪H's): the reference trajectory W^H must be
    # independent of S for the bound (DESIGN.md §2), and the data it trains on — H after
    # preprocessing — would depend on S through S's mean and std. H's statistics are applied to
    # every split, so S, V and T see the same map. A column (or regression target) that is
    # constant on H is centred but not scaled (scale 1, as scikit-learn's StandardScaler does):
    # flooring its std at a tiny value instead would blow up the rows of S where it varies.
    x_ref, y_ref = raw["reference"]
    x_mean = x_ref.mean(axis=0)
    x_std = x_ref.std(axis=0)
    x_scale = np.where(x_std > _MIN_STD, x_std, 1.0)
    if task == "regression":
        y_mean = float(y_ref.mean())
        y_std = float(y_ref.std())
        y_scale = y_std if y_std > _MIN_STD else 1.0
    else:
        y_mean, y_scale = 0.0, 1.0

    def make(x: np.ndarray, y: np.ndarray) -> Split:
        xs = np.ascontiguousarray((x - x_mean) / x_scale, dtype=np.float32)
        if task == "regression":
            ys = np.ascontiguousarray((y - y_mean) / y_scale, dtype=np.float32)
        else:
            ys = np.ascontiguousarray(y, dtype=np.int64)
        return Split(x=xs, y=ys)

    reference = make(*raw["reference"])
    val = reference if cfg.reference_as_validation else make(*raw["val"])
    test = make(*raw["test"]) if raw.get("test") is not None else None
    return Dataset(
        train=make(*raw["train"]),
        reference=reference,
        val=val,
        test=test,
        task=task,
        n_features=int(x_ref.shape[1]),
        n_outputs=int(n_outputs),
        description=description,
        feature_names=table.feature_names,
        classes=table.classes,
        # float64, as the splits were computed: a served model maps raw rows exactly as they were.
        x_mean=np.ascontiguousarray(x_mean, dtype=np.float64),
        x_scale=np.ascontiguousarray(x_scale, dtype=np.float64),
        y_mean=y_mean,
        y_scale=y_scale,
    )
