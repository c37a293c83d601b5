"""The recommendation rule with standard errors, and how `rank` explains its answer."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from tiny_study import TINY_STUDY, write_tiny_study

from hsgd_tune.advise.ranking import rank_study, render, rule_name, rule_text
from hsgd_tune.errors import ConfigError
from hsgd_tune.search.trials import rule_order
from hsgd_tune.studyfile.config import RankConfig, load_study


def naive_order(within, prefer, tolerance, se, k):
    """The rule spelled out with loops: band around the best, band first by prefer, rest by within."""
    ok = [i for i in range(len(within)) if np.isfinite(within[i]) and np.isfinite(prefer[i])]
    if not ok:
        return []
    best = min(ok, key=lambda i: (within[i], i))
    edge = within[best] + tolerance * abs(within[best]) + k * se[best]
    inside = sorted((i for i in ok if within[i] <= edge), key=lambda i: (prefer[i], within[i], i))
    outside = sorted((i for i in ok if within[i] > edge), key=lambda i: (within[i], prefer[i], i))
    return inside + outside


@pytest.mark.parametrize("seed", range(20))
def test_rule_order_matches_the_rule_spelled_out(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    within = rng.choice([0.5, 0.52, 0.55, 0.6, 1.0, np.nan], size=n)  # ties on purpose
    prefer = rng.choice([1.0, 2.0, 3.0, np.nan], size=n)
    se = rng.choice([0.0, 0.03, 0.1], size=n)
    for tolerance, k in ((0.0, 0.0), (0.0, 1.0), (0.05, 1.0), (0.1, 0.0)):
        order, _ = rule_order(within, prefer, tolerance, se, k)
        assert list(order) == naive_order(within, prefer, tolerance, se, k)


def test_one_standard_error_band_hand_computed():
    within = np.array([0.50, 0.52, 0.56])
    se = np.array([0.03, 0.01, 0.01])  # the best trial's SE sets the band: 0.50 + 0.03
    order, band = rule_order(within, np.array([9.0, 3.0, 1.0]), 0.0, se, 1.0)
    assert band == pytest.approx(0.53)
    assert list(order) == [1, 0, 2]  # 1 and 0 in the band by prefer; 2 outside it


def test_rule_names_and_texts():
    assert rule_name(RankConfig("crossfit_loss", 0.0, "crossfit_loss")) == "crossfit_loss"
    assert rule_name(RankConfig("val_loss", 0.05, "risk_bound")) == "val_loss +5% → risk_bound"
    assert rule_name(RankConfig("crossfit_loss", 0.0, "gap_bound", 1.0)) == "crossfit_loss 1 SE → gap_bound"
    assert rule_text(RankConfig("crossfit_loss", 0.0, "risk_bound")) == (
        "the finished trial with the smallest crossfit_loss"
    )
    assert "within 2 standard errors of the best" in rule_text(RankConfig("val_loss", 0.0, "gap_bound", 2.0))


# -- [rank] standard_errors in the study file ----------------------------------------------------


def test_standard_errors_is_read_from_the_rank_table(tmp_path):
    text = TINY_STUDY + '\n[rank]\nwithin = "crossfit_loss"\nstandard_errors = 1.0\nprefer = "gap_bound"\n'
    rule = load_study(write_tiny_study(tmp_path, text)).rank
    assert (rule.within, rule.standard_errors, rule.prefer) == ("crossfit_loss", 1.0, "gap_bound")


@pytest.mark.parametrize(
    ("table", "rule"),
    [
        ("standard_errors = -1.0", "must be non-negative"),
        ('within = "risk_bound"\nstandard_errors = 1.0', "needs \\[rank\\] within to be an estimate"),
    ],
)
def test_bad_standard_errors_name_file_key_and_rule(tmp_path, table, rule):
    path = write_tiny_study(tmp_path, TINY_STUDY + f"\n[rank]\n{table}\n")
    with pytest.raises(ConfigError, match=rf"tiny.toml: rank.standard_errors: {rule}"):
        load_study(path)


# -- the explanation, on a study built trial by trial ---------------------------------------------


def study_with(tmp_path, trials: list[dict]) -> optuna.Study:
    """A real (journal-file) study whose finished trials carry the given user attributes."""
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log"))
    )
    study = optuna.create_study(study_name="made", storage=storage, directions=["minimize", "minimize"])
    study.set_user_attr("objectives", ["crossfit_loss", "risk_bound"])
    for i, attrs in enumerate(trials):
        study.add_trial(
            optuna.trial.create_trial(
                params={"batch_size": 8 * (i + 1)},
                distributions={"batch_size": CategoricalDistribution([8, 16, 24, 32])},
                values=[attrs["crossfit/loss"], attrs["bound/risk_bound"]],
                user_attrs=attrs,
            )
        )
    return study


def attrs(crossfit: float, se: float, gap: float, **more) -> dict:
    return {
        "crossfit/loss": crossfit,
        "crossfit/loss_se": se,
        "bound/gap_bound": gap,
        "bound/risk_bound": gap + 0.1,
        **more,
    }


def test_explanation_names_estimate_certificates_and_why_the_runner_up_lost(tmp_path):
    study = study_with(
        tmp_path,
        [
            attrs(0.30, 0.02, 5.0),
            attrs(0.31, 0.02, 2.0, **{"certificate/bound": 0.25}),
            attrs(0.50, 0.02, 1.0),
        ],
    )
    ranking = rank_study(study, RankConfig("crossfit_loss", 0.0, "gap_bound", 1.0))
    assert ranking.recommended == 1 and ranking.order == [1, 0, 2]
    lines = "\n".join(ranking.explain())
    assert "rule: crossfit_loss 1 SE → gap_bound" in lines
    assert "rests on: crossfit_loss = 0.31 ± 0.02 (standard error" in lines
    assert "certificate/bound ≤ 0.25" in lines
    assert "runner-up: trial 0 (batch_size=8), crossfit_loss = 0.3 ± 0.02: also in the band" in lines
    assert "a larger gap_bound: 5 vs 2" in lines


def test_plain_rule_runner_up_lost_by_a_difference_in_standard_errors(tmp_path):
    study = study_with(tmp_path, [attrs(0.30, 0.03, 5.0), attrs(0.35, 0.04, 2.0)])
    ranking = rank_study(study, RankConfig("crossfit_loss", 0.0, "crossfit_loss"))
    (runner_up,) = [line for line in ranking.explain() if "runner-up" in line]
    assert runner_up.endswith("larger by 0.05, 1 standard errors of the difference (unpaired)")
    assert "certificates" not in "\n".join(ranking.explain())  # MLflow not read: unknown, not shown
    read = dataclasses.replace(ranking, certificates={})  # MLflow read, no certificate there either
    assert "certificates: none yet (hsgd-tune certify computes them)" in "\n".join(read.explain())


def test_json_names_the_rule_the_recommendation_and_the_runner_up(tmp_path):
    study = study_with(tmp_path, [attrs(0.30, 0.03, 5.0), attrs(0.35, 0.04, 2.0)])
    doc = json.loads(render(rank_study(study, RankConfig("crossfit_loss", 0.0, "crossfit_loss")), "json"))
    assert doc["rule"]["name"] == "crossfit_loss"
    assert (doc["recommended_trial"], doc["runner_up"]) == (0, 1)
    assert doc["explanation"][0] == "rule: crossfit_loss"
