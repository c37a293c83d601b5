"""Held-out estimates and their standard errors (hsgd_tune/certify/estimates.py), against naive
computations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from hsgd_tune.certify.estimates import crossfit_mean_se, heldout_estimates, mean_se, pooled_mean_se
from hsgd_tune.train.models import build_model, load_flat_parameters
from hsgd_tune.train.twin import H_RUN, S_RUN, per_example_loss, train_twin
from tests.test_training import BUILTIN, make_data, settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def naive_se(values) -> float:
    """sd with Bessel's correction over √n, written out term by term."""
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def test_mean_se_is_the_mean_and_sd_over_root_n():
    values = [0.3, 1.7, 0.2, 2.5, 0.9]
    mean, se = mean_se(np.array(values))
    assert math.isclose(mean, sum(values) / 5, rel_tol=1e-15)
    assert math.isclose(se, naive_se(values), rel_tol=1e-12)


def test_mean_se_hand_computed():
    # 1, 2, 3: mean 2, sd 1 → SE = 1/√3
    assert mean_se(np.array([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1 / math.sqrt(3)), rel=1e-15)


def test_one_value_has_no_standard_error_and_no_value_is_an_error():
    mean, se = mean_se(np.array([4.0]))
    assert mean == 4.0 and math.isnan(se)
    with pytest.raises(ValueError, match="at least one value"):
        mean_se(np.array([]))


def test_crossfit_is_the_equal_weight_mean_of_the_folds_with_independent_fold_errors():
    a, b = [0.1, 0.4, 0.3, 0.2], [1.0, 0.5, 0.8]  # folds of different sizes weigh the same
    mean, se = crossfit_mean_se(np.array(a), np.array(b))
    assert math.isclose(mean, (sum(a) / 4 + sum(b) / 3) / 2, rel_tol=1e-15)
    # Var((m_a + m_b)/2) = (Var m_a + Var m_b)/4 for independent folds
    assert math.isclose(se, math.sqrt(naive_se(a) ** 2 + naive_se(b) ** 2) / 2, rel_tol=1e-12)


def test_crossfit_se_matches_the_spread_of_simulated_crossfits():
    # Two independent folds of 200 exponential losses each: the SE formula predicts the spread.
    rng = np.random.default_rng(0)
    draws = [crossfit_mean_se(rng.exponential(1.0, 200), rng.exponential(2.0, 200)) for _ in range(4000)]
    means, ses = np.array(draws).T
    assert np.std(means) == pytest.approx(np.median(ses), rel=0.05)


def test_pooled_treats_the_parts_as_one_sample():
    v, h = [0.5, 0.7], [0.1, 0.2, 0.9]
    assert pooled_mean_se(np.array(v), np.array(h)) == pytest.approx(
        (sum(v + h) / 5, naive_se(v + h)), rel=1e-12
    )


# ---------------------------------------------------------------------------------------------
# A twin run's estimates
# ---------------------------------------------------------------------------------------------


def _losses(flat: np.ndarray, split, task="classification") -> np.ndarray:
    """Naive: rebuild the model from a flat weight vector and evaluate it row by row."""
    model = load_flat_parameters(build_model(BUILTIN), torch.as_tensor(flat))
    with torch.no_grad():
        return np.array(
            [
                float(per_example_loss(model(torch.as_tensor(x[None])), torch.as_tensor(y[None]), task)[0])
                for x, y in zip(split.x, split.y, strict=True)
            ]
        )


def test_twin_run_estimates_match_a_model_rebuilt_from_each_runs_final_weights():
    data = make_data()
    run = train_twin(data, BUILTIN, settings())
    metrics = heldout_estimates(data, run).metrics()
    s_on_h = _losses(run.last_iterates[S_RUN], data.reference)
    h_on_s = _losses(run.last_iterates[H_RUN], data.train)
    s_on_v = _losses(run.last_iterates[S_RUN], data.val)
    assert metrics["heldout/loss"] == pytest.approx(s_on_h.mean(), rel=1e-5)
    assert metrics["heldout/loss_se"] == pytest.approx(naive_se(list(s_on_h)), rel=1e-4)
    assert metrics["crossfit/loss"] == pytest.approx((s_on_h.mean() + h_on_s.mean()) / 2, rel=1e-5)
    assert metrics["val/loss_se"] == pytest.approx(naive_se(list(s_on_v)), rel=1e-4)
    assert run.final["val/loss"] == pytest.approx(s_on_v.mean(), rel=1e-5)  # the same val/loss
    for name in ("heldout/error", "heldout/error_se", "crossfit/error", "crossfit/error_se", "val/error_se"):
        assert math.isfinite(metrics[name]), name


def test_regression_has_no_error_metrics():
    data = make_data()
    data = dataclasses.replace(
        data,
        task="regression",
        n_outputs=1,
        **{
            s: dataclasses.replace(getattr(data, s), y=getattr(data, s).x[:, 0].copy())
            for s in ("train", "reference", "val")
        },
    )
    spec = dataclasses.replace(BUILTIN, n_outputs=1)
    metrics = heldout_estimates(data, train_twin(data, spec, settings(learning_rate=0.05))).metrics()
    assert {"heldout/loss", "crossfit/loss", "crossfit/loss_se"} <= set(metrics)
    assert not [k for k in metrics if "error" in k]


def test_sketched_run_without_final_weights_skips_crossfit_and_says_why():
    data = make_data()
    run = train_twin(data, BUILTIN, settings(sketch_above=10, sketch_dim=16))
    run = dataclasses.replace(run, last_iterates=None)  # as if only the sketches were kept
    heldout = heldout_estimates(data, run)
    assert "crossfit/loss" not in heldout.metrics() and "heldout/loss" in heldout.metrics()
    assert "JL sketch" in heldout.tags()["hsgd.skipped.crossfit"]


# ---------------------------------------------------------------------------------------------
# In a study: logged to MLflow, kept in Optuna, usable as an objective
# ---------------------------------------------------------------------------------------------


def test_every_finished_trial_logs_its_estimates_and_crossfit_loss_can_be_an_objective(workdir):
    from mlflow import MlflowClient

    from hsgd_tune.search.runner import run_study
    from hsgd_tune.search.study import lookup_study
    from hsgd_tune.studyfile.config import load_study
    from tests.tiny_study import TINY_STUDY, write_tiny_study

    text = TINY_STUDY.replace("n_trials = 5", "n_trials = 3")
    text += '\n[objectives]\nminimize = ["crossfit_loss", "risk_bound"]\n\n[diagnostics]\ntrials = "none"\n'
    cfg = load_study(write_tiny_study(workdir, text))
    run_study(cfg, progress=False)
    study = lookup_study(cfg.run.storage, cfg.name)
    client = MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    trials = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(trials) == 3
    for t in trials:
        metrics = client.get_run(t.user_attrs["mlflow_run_id"]).data.metrics
        for key in ("val/loss_se", "heldout/loss", "heldout/loss_se", "crossfit/loss", "crossfit/loss_se"):
            assert math.isfinite(metrics[key]) and t.user_attrs[key] == pytest.approx(metrics[key]), key
        for key in ("heldout/error", "crossfit/error", "crossfit/error_se"):  # in MLflow only
            assert key in metrics and key not in t.user_attrs, key
        assert t.values[0] == pytest.approx(metrics["crossfit/loss"], rel=1e-12)
