"""Tests for hsgd_tune.data.datasets: sources, splits, standardization, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from hsgd_tune.data.datasets import Dataset, DataWarning, load_dataset, split_indices
from hsgd_tune.errors import ConfigError, DataError
from hsgd_tune.studyfile.config import DataConfig, SyntheticConfig

# data/datasets.py is duck-typed on these; the tests use the real config classes.
_SynthCfg, _DataCfg = SyntheticConfig, DataConfig


def _load(seed: int = 0, **kw) -> Dataset:
    return load_dataset(_DataCfg(**kw), seed)


def _synth(seed: int = 0, *, n_train=200, n_val=50, task=None, **syn) -> Dataset:
    return _load(
        seed,
        source="synthetic",
        n_train=n_train,
        n_val=n_val,
        task=task,
        synthetic=_SynthCfg(**syn),
    )


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _csv_cfg(path: Path, target: str = "label", **kw) -> _DataCfg:
    kw.setdefault("n_train", 4)
    kw.setdefault("n_val", 2)
    return _DataCfg(source="csv", path=path, target=target, **kw)


# ---------------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    ("source", "d", "k"),
    [("digits", 64, 10), ("breast_cancer", 30, 2), ("wine", 13, 3)],
)
def test_builtin_loads_with_shapes_and_dtypes(source, d, k):
    ds = _load(source=source, n_train=60, n_val=20, n_test=10)
    assert (ds.task, ds.n_features, ds.n_outputs) == ("classification", d, k)
    for split, n in [(ds.train, 60), (ds.reference, 60), (ds.val, 20), (ds.test, 10)]:
        assert split.x.shape == (n, d) and split.y.shape == (n,)
        assert split.x.dtype == np.float32 and split.y.dtype == np.int64
        assert split.x.flags.c_contiguous and split.y.flags.c_contiguous
        assert split.y.min() >= 0 and split.y.max() < k
    assert ds.description.startswith(f"{source} (")
    assert f"{d} features, {k} classes" in ds.description


def test_builtin_splits_are_disjoint():
    # All 569 raw rows are distinct and one affine map is applied to every split,
    # so distinct source rows stay distinct.
    ds = _load(source="breast_cancer", n_train=200, n_val=100, n_test=50)
    parts = [_rows(s.x) for s in (ds.train, ds.reference, ds.val, ds.test)]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 200 + 200 + 100 + 50


def test_split_indices_are_disjoint_and_sized():
    cfg = _DataCfg(source="digits", n_train=100, n_val=30, n_reference=80, n_test=20)
    idx = split_indices(1000, cfg, seed=3)
    sizes = {role: len(i) for role, i in idx.items()}
    assert sizes == {"train": 100, "reference": 80, "val": 30, "test": 20}
    every = np.concatenate(list(idx.values()))
    assert len(np.unique(every)) == len(every)
    assert every.min() >= 0 and every.max() < 1000


def test_test_split_is_none_without_n_test():
    assert _load(source="wine", n_train=50, n_val=20).test is None


def test_splits_are_deterministic_in_seed():
    a = _load(seed=7, source="digits", n_train=100, n_val=30)
    b = _load(seed=7, source="digits", n_train=100, n_val=30)
    for sa, sb in [(a.train, b.train), (a.reference, b.reference), (a.val, b.val)]:
        np.testing.assert_array_equal(sa.x, sb.x)
        np.testing.assert_array_equal(sa.y, sb.y)


def test_splits_differ_for_another_seed():
    cfg = _DataCfg(source="digits", n_train=100, n_val=30)
    a, b = split_indices(1797, cfg, seed=1), split_indices(1797, cfg, seed=2)
    assert not np.array_equal(a["train"], b["train"])
    assert not np.array_equal(a["reference"], b["reference"])


def test_reference_shrinks_with_warning_when_data_run_short():
    with pytest.warns(DataWarning, match=r"H has 69 rows instead of 100, smaller than S"):
        ds = _load(source="wine", n_train=100, n_val=9)
    assert (len(ds.train), len(ds.val), len(ds.reference)) == (100, 9, 178 - 109)


def test_no_warning_when_reference_fits():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = _load(source="wine", n_train=60, n_val=20)
    assert len(ds.reference) == 60


def test_explicit_n_reference_is_honoured():
    ds = _load(source="wine", n_train=60, n_val=20, n_reference=30)
    assert len(ds.reference) == 30


def test_request_too_large_is_data_error():
    with pytest.raises(DataError) as info:
        _load(source="wine", n_train=150, n_val=30)
    err = info.value
    assert isinstance(err, ConfigError)
    assert err.key == "data.n_train" and err.value == 150
    assert "178 rows of wine" in err.rule and "(150 + 30)" in err.rule


def test_reference_below_minimum_is_data_error():
    # S + V fit (170 <= 178) but only 8 rows would be left for H, fewer than min(n_train, 10).
    with pytest.raises(DataError, match=r"data\.n_train: .*at least 10 reference rows"):
        _load(source="wine", n_train=150, n_val=20)


def test_bad_size_is_data_error():
    with pytest.raises(DataError) as info:
        _load(source="wine", n_train=50, n_val=0)
    assert info.value.key == "data.n_val" and info.value.value == 0


def test_reference_as_validation_shares_h_and_ignores_n_val():
    ds = _load(source="wine", n_train=80, n_val=10_000, reference_as_validation=True)
    assert ds.val is ds.reference
    assert len(ds.reference) == 80
    assert not _rows(ds.train.x) & _rows(ds.reference.x)


def test_standardization_uses_reference_statistics():
    ds = _load(source="breast_cancer", n_train=200, n_val=100)
    h = ds.reference.x.astype(np.float64)
    np.testing.assert_allclose(h.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(h.std(axis=0), 1.0, atol=1e-4)
    # S is mapped with H's statistics, so its own mean is not exactly 0.
    assert np.abs(ds.train.x.mean(axis=0)).max() > 1e-3


def test_column_constant_on_reference_is_centred_not_blown_up(tmp_path):
    # Column "c" is 5 on the rows that become H but varies elsewhere.
    cfg = _csv_cfg(tmp_path / "x.csv", n_train=10, n_val=5, n_reference=10)
    idx = split_indices(25, cfg, seed=0)
    c = np.arange(25, dtype=float)
    c[idx["reference"]] = 5.0
    lines = ["a,c,label"] + [f"{i},{c[i]},{i % 2}" for i in range(25)]
    _write(tmp_path, "\n".join(lines) + "\n", "x.csv")
    ds = load_dataset(cfg, seed=0)
    assert np.all(ds.reference.x[:, 1] == 0.0)
    assert ds.x_scale[1] == 1.0
    np.testing.assert_allclose(np.sort(ds.train.x[:, 1] + 5), np.sort(c[idx["train"]]))


def test_digits_constant_pixel_is_zero_everywhere():
    ds = _load(source="digits", n_train=100, n_val=30, n_test=10)
    for split in (ds.train, ds.reference, ds.val, ds.test):
        assert np.all(split.x[:, 0] == 0.0)  # pixel_0_0 is always 0 in digits
        assert np.isfinite(split.x).all()


def test_unknown_source_is_data_error():
    with pytest.raises(DataError, match=r"data\.source: must be one of .*got 'iris'"):
        _load(source="iris", n_train=10, n_val=5)


def test_builtin_regression_is_data_error():
    with pytest.raises(DataError) as info:
        _load(source="digits", n_train=10, n_val=5, task="regression")
    assert info.value.key == "data.task" and info.value.value == "regression"


# ---------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("kind", ["teacher", "mixture"])
def test_synthetic_classification(kind):
    ds = _synth(kind=kind, n_features=7, n_classes=4, n_train=20_000, n_val=300)
    assert (ds.task, ds.n_features, ds.n_outputs) == ("classification", 7, 4)
    assert ds.train.x.shape == (20_000, 7) and ds.train.x.dtype == np.float32
    assert ds.train.y.dtype == np.int64
    assert set(np.unique(ds.train.y)) == {0, 1, 2, 3}
    assert ds.val.x.shape == (300, 7) and len(ds.reference) == 20_000


@pytest.mark.parametrize("kind", ["teacher", "mixture"])
def test_synthetic_regression(kind):
    ds = _synth(kind=kind, task="regression", n_features=5, n_train=3000, n_val=100)
    assert (ds.task, ds.n_outputs) == ("regression", 1)
    assert ds.train.y.shape == (3000,) and ds.train.y.dtype == np.float32
    assert ds.train.y.std() > 0.5  # a real signal, standardized with H's statistics
    assert abs(float(ds.reference.y.mean())) < 1e-5
    assert abs(float(ds.reference.y.std()) - 1.0) < 1e-4


def test_synthetic_regression_target_follows_the_teacher():
    # With no noise the target is a smooth function of x (a tanh network near its linear
    # regime), so a linear fit explains most of its variance; pure noise would give none.
    ds = _synth(task="regression", noise=0.0, n_features=3, n_train=4000)
    x = np.c_[ds.train.x, np.ones(len(ds.train))]
    coef, *_ = np.linalg.lstsq(x, ds.train.y, rcond=None)
    resid = ds.train.y - x @ coef
    assert resid.var() < 0.5 * ds.train.y.var()


def test_synthetic_label_noise_one_gives_uniform_labels():
    ds = _synth(noise=1.0, n_classes=3, n_train=30_000)
    freq = np.bincount(ds.train.y, minlength=3) / 30_000
    np.testing.assert_allclose(freq, 1 / 3, atol=0.02)


def test_synthetic_is_deterministic_in_seed():
    a, b, c = _synth(seed=5), _synth(seed=5), _synth(seed=6)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    assert not np.array_equal(a.train.x, c.train.x)


def test_synthetic_rows_do_not_depend_on_the_requested_size():
    small = _load(source="synthetic", n_train=50, n_val=10, n_reference=300)
    large = _load(source="synthetic", n_train=5000, n_val=2000, n_reference=300)
    np.testing.assert_array_equal(small.train.x, large.train.x[:50])
    np.testing.assert_array_equal(small.train.y, large.train.y[:50])
    np.testing.assert_array_equal(small.reference.x, large.reference.x)


def test_synthetic_splits_are_independent_draws():
    ds = _load(source="synthetic", n_train=500, n_val=200, n_test=100)
    parts = [_rows(s.x) for s in (ds.train, ds.reference, ds.val, ds.test)]
    assert len(set().union(*parts)) == 500 + 500 + 200 + 100


def test_synthetic_bad_kind_is_data_error():
    with pytest.raises(DataError) as info:
        _synth(kind="spiral")
    assert info.value.key == "data.synthetic.kind" and info.value.value == "spiral"


# ---------------------------------------------------------------------------------- CSV


def test_csv_classification_with_string_labels(tmp_path):
    labels = ["cat", "dog", "ant", "dog", "cat", "ant", "dog", "cat", "ant", "cat"]
    lines = ["w,h,label"] + [f"{i},{i * 0.5},{lab}" for i, lab in enumerate(labels)]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    ds = load_dataset(_csv_cfg(path, n_train=4, n_val=2), seed=0)
    assert ds.task == "classification" and ds.n_outputs == 3
    assert ds.classes == ("ant", "cat", "dog")
    assert ds.feature_names == ("w", "h")
    assert ds.description == "data.csv (10 rows, 2 features, 3 classes)"
    # Rows keep their labels: w identifies the row; label index = position in sorted classes.
    for split in (ds.train, ds.reference, ds.val):
        w = np.rint(split.x[:, 0] * ds.x_scale[0] + ds.x_mean[0]).astype(int)
        assert [ds.classes[k] for k in split.y] == [labels[i] for i in w]


def test_csv_regression_is_inferred_for_a_float_target(tmp_path):
    lines = ["a,b,price"] + [f"{i},{i % 3},{2.5 * i + 1}" for i in range(20)]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    ds = load_dataset(_csv_cfg(path, target="price", n_train=8, n_val=4), seed=1)
    assert (ds.task, ds.n_outputs) == ("regression", 1)
    assert ds.train.y.dtype == np.float32
    # Targets are standardized with H's statistics and map back exactly.
    assert abs(float(ds.reference.y.mean())) < 1e-6
    raw = ds.train.y * ds.y_scale + ds.y_mean
    a = ds.train.x[:, 0] * ds.x_scale[0] + ds.x_mean[0]
    np.testing.assert_allclose(raw, 2.5 * a + 1, rtol=1e-5, atol=1e-4)


def test_csv_integer_target_with_many_values_is_regression(tmp_path):
    lines = ["a,age"] + [f"{i},{i}" for i in range(60)]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    assert load_dataset(_csv_cfg(path, target="age"), seed=0).task == "regression"


def test_csv_integer_target_with_few_values_is_classification(tmp_path):
    lines = ["a,grade"] + [f"{i},{10 + i % 3}" for i in range(12)]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    ds = load_dataset(_csv_cfg(path, target="grade"), seed=0)
    assert ds.task == "classification" and ds.classes == (10, 11, 12)


def test_csv_missing_file_is_data_error(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError) as info:
        load_dataset(_csv_cfg(path), seed=0)
    err = info.value
    assert err.key == "data.path" and err.value == str(path)
    assert "file must exist" in str(err)


def test_csv_missing_target_column_is_data_error(tmp_path):
    path = _write(tmp_path, "a,b,kind\n1,2,x\n3,4,y\n")
    with pytest.raises(DataError) as info:
        load_dataset(_csv_cfg(path, target="label"), seed=0)
    err = info.value
    assert err.key == "data.target" and err.value == "label"
    assert "'a', 'b', 'kind'" in err.rule
    assert str(err).startswith(f"{path}: data.target:")


def test_csv_non_numeric_feature_is_data_error(tmp_path):
    path = _write(tmp_path, "size,colour,label\n1,2,a\n2,red,b\n3,4,a\n")
    with pytest.raises(DataError) as info:
        load_dataset(_csv_cfg(path), seed=0)
    err = info.value
    assert err.file == path and err.value == "red"
    assert "feature column 'colour' must be numeric (data row 2)" in err.rule


def test_csv_missing_value_is_data_error(tmp_path):
    path = _write(tmp_path, "age,score,label\n1,2,a\n2,,b\n3,4,a\n5,,b\n")
    with pytest.raises(DataError) as info:
        load_dataset(_csv_cfg(path), seed=0)
    err = info.value
    assert err.file == path
    assert "column 'score' must have no missing values (2 missing, first at data row 2)" in str(err)


def test_csv_infinite_feature_is_data_error(tmp_path):
    path = _write(tmp_path, "a,label\n1,x\ninf,y\n")
    with pytest.raises(DataError, match=r"feature column 'a' must be finite \(data row 2\)"):
        load_dataset(_csv_cfg(path), seed=0)


@pytest.mark.parametrize(
    ("text", "rule"),
    [("", "CSV file is empty"), ("a,label\n", "header but no data rows")],
)
def test_csv_empty_file_is_data_error(tmp_path, text, rule):
    path = _write(tmp_path, text)
    with pytest.raises(DataError) as info:
        load_dataset(_csv_cfg(path), seed=0)
    assert info.value.key == "data.path" and rule in info.value.rule
    assert info.value.value == str(path)


def test_csv_unreadable_file_is_data_error(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"a,label\n\xff\xfe,\x80\n")
    with pytest.raises(DataError, match=r"data\.path: CSV file cannot be read"):
        load_dataset(_csv_cfg(path), seed=0)


def test_csv_regression_with_text_target_is_data_error(tmp_path):
    path = _write(tmp_path, "a,label\n1,x\n2,y\n3,x\n")
    with pytest.raises(DataError) as info:
        load_dataset(_csv_cfg(path, task="regression"), seed=0)
    err = info.value
    assert err.key == "data.target" and err.value == "x"
    assert "regression needs a numeric target" in err.rule


def test_csv_classes_and_task_are_read_from_the_rows_outside_s(tmp_path):
    """Inferred from every row, the model's outputs (so the reference run) would depend on S."""
    from hsgd_tune.data.datasets import split_indices

    labels = [i % 3 for i in range(30)]
    cfg = _csv_cfg(tmp_path / "data.csv", n_train=10, n_val=5)
    train = set(split_indices(30, cfg, 0)["train"].tolist())
    only_in_s = min(train)
    labels[only_in_s] = 7  # a class no row outside S has
    _write(tmp_path, "\n".join(["a,label"] + [f"{i},{lab}" for i, lab in enumerate(labels)]) + "\n")
    with pytest.raises(DataError, match="only the training split S holds") as info:
        load_dataset(cfg, seed=0)
    assert info.value.key == "data.target" and info.value.value == 7
    labels[only_in_s] = 0
    _write(tmp_path, "\n".join(["a,label"] + [f"{i},{lab}" for i, lab in enumerate(labels)]) + "\n")
    assert load_dataset(cfg, seed=0).classes == (0, 1, 2)
