"""Which rule picks the best configuration from the same rows? (issue #12: selection at equal data)

Every study holds S (train), H (reference) and V (validation). A plain Optuna user with the same rows
would train on S and validate on V ∪ H: that is the **peer** every rule is compared with. The twin
run gives more: the S-model is held out on H, and the H-model (same configuration, trained on H) is
held out on S, a 2-fold cross-fit at no extra training (hsgd_tune/certify/estimates.py). Every
rule deploys the S-model of the trial it picks, so only the choice differs; we report the test
loss of that S-model.

Per seed (one study: its own splits, initialisation and minibatches) and task, two candidate sets
are trained once and shared by every rule and every n_val:

- **grid**: the fixed 6 × 4 grid of learning rate × batch size (benchmarks/common.py);
- **tpe**: an Optuna TPE study (lr log-uniform on [0.005, 0.2], b in {8, 16, 32, 64}) driven by the
  S-model's loss on H, the part that the peer's objective (V ∪ H, of which H is 71-91 %) and the
  cross-fit (half of it) share, so that one TPE run serves every rule. It is not each rule's own
  search: a rule that drives the sampler itself could do better or worse.

Validation sets of 50, 100 and 200 rows are the first rows of the seed's 200-row V. The rules:

- ``val (V)``: smallest loss on V; ``val (V∪H)``: smallest loss on V ∪ H (the peer);
- ``heldout (H)``: smallest S-model loss on H; ``crossfit``: smallest mean of the S-model on H and
  the H-model on S; ``crossfit+V``: the same with the S-model on V ∪ H (all held-out rows);
- ``heldout cert``: smallest held-out kl certificate, kl⁻¹(ê_H, ln(T/δ)/|H|) on the 0-1 error of
  the S-model on H (clipped loss / B for regression), δ = 0.05 split over the T candidates;
- ``1-SE crossfit → gap bound`` / ``→ heldout cert``: among trials whose cross-fit loss is within
  one standard error (of the best trial's cross-fit) of the best, the smallest ``bound/gap_bound`` /
  held-out certificate; ``1-SE V∪H → gap bound``: the same around the peer's estimate;
- ``old default``: the landed rank rule, validation loss on V within 5 % of the best, smallest
  ``bound/risk_bound``;
- ``oracle``: the smallest test loss among the candidates.

For each rule: the mean over seeds of Δ = test loss(rule) − test loss(peer), a paired 95 % t interval,
and win / tie / loss (tie: equal test loss, mostly the same trial).

    python -m benchmarks.selection --quick           # 4 tasks, 3 seeds, 300 steps: a few minutes
    python -m benchmarks.selection --jobs 2          # full: 10 seeds, see FULL
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from scipy import stats

import hsgd_tune
from benchmarks.common import BATCH_SIZES, LEARNING_RATES, RESULTS, Clock, header, markdown, use_one_thread
from hsgd_tune.bound import kl_inverse_upper
from hsgd_tune.certify.estimates import crossfit_mean_se, mean_se, per_example, pooled_mean_se
from hsgd_tune.data.datasets import Dataset, DataWarning, load_dataset
from hsgd_tune.errors import DivergedError
from hsgd_tune.search.objective import evaluate
from hsgd_tune.studyfile.config import StudyConfig, parse_study

#: S, H, V, T of each task. Digits: 1797 rows; breast cancer: 569 rows (100 + 100 + 200 + 169).
TASKS = {
    "digits": {"source": "digits", "n_train": 500, "n_reference": 500, "n_val": 200, "n_test": 597},
    "synthetic": {
        "source": "synthetic",
        "n_train": 500,
        "n_reference": 500,
        "n_val": 200,
        "n_test": 20000,
        "synthetic": {"kind": "teacher", "n_features": 20, "n_classes": 3, "noise": 0.1},
    },
    "breast_cancer": {
        "source": "breast_cancer",
        "n_train": 100,
        "n_reference": 100,
        "n_val": 200,
        "n_test": 169,
    },
    "regression": {
        "source": "synthetic",
        "task": "regression",
        "n_train": 300,
        "n_reference": 300,
        "n_val": 200,
        "n_test": 5000,
        "synthetic": {"kind": "teacher", "n_features": 10, "noise": 0.5},
    },
}
VAL_SIZES = (50, 100, 200)
#: The rules of :func:`picks`, in the order the tables list them.
RULES = (
    "val (V)",
    "val (V∪H)",
    "heldout (H)",
    "crossfit",
    "crossfit+V",
    "heldout cert",
    "1-SE crossfit → gap bound",
    "1-SE crossfit → heldout cert",
    "1-SE V∪H → gap bound",
    "old default",
    "oracle",
)
DELTA = 0.05
PEER = "val (V∪H)"


@dataclass(frozen=True)
class Budget:
    steps: int
    seeds: int
    tpe_trials: int
    n_test_synthetic: int


#: 600 steps (not the correlation benchmark's 1000) so that 4 tasks × 10 seeds × 40 trials fit in
#: about 20 minutes with --jobs 2 on the shared 2-core machine.
FULL = Budget(steps=600, seeds=10, tpe_trials=16, n_test_synthetic=20000)
QUICK = Budget(steps=300, seeds=3, tpe_trials=12, n_test_synthetic=5000)


# ---------------------------------------------------------------------------------------------
# Trials: trained once per (task, seed, candidate set), cached
# ---------------------------------------------------------------------------------------------


def study_config(task: str, seed: int, budget: Budget) -> StudyConfig:
    data = dict(TASKS[task])
    if data.get("n_test", 0) > 10000:
        data["n_test"] = budget.n_test_synthetic
    n_trials = len(LEARNING_RATES) * len(BATCH_SIZES)
    raw = {
        "name": f"select-{task}",
        "seed": seed,
        "data": data,
        "model": {"kind": "mlp", "widths": [64, 64]},
        "search": {
            "learning_rate": {"low": 0.005, "high": 0.2},
            "batch_size": {"choices": list(BATCH_SIZES)},
        },
        "training": {"steps": budget.steps, "record_every": 25},
        "objectives": {"minimize": ["val_loss", "risk_bound"]},  # explicit: defaults may change
        "certificate": {"enabled": False},  # the rules use the gap bound and held-out estimates only
        "diagnostics": {"tail_index": False, "analytic": False, "trials": "none"},
        "run": {"n_trials": n_trials},
    }
    return parse_study(raw, Path.cwd())


def trial_row(cfg: StudyConfig, data: Dataset, lr: float, b: int) -> dict:
    """Per-example arrays of one trial (for any n_val), or ``diverged=True``."""
    try:
        outcome = evaluate(cfg, data, {"learning_rate": lr, "batch_size": b})
    except DivergedError:
        return {"learning_rate": lr, "batch_size": b, "diverged": True}
    held = outcome.heldout
    test_loss, test_error = per_example(outcome.run.model, data.test, data.task)
    return {
        "learning_rate": lr,
        "batch_size": b,
        "diverged": False,
        "val_loss": held.val[0],  # (n_V,) S-model on V
        "val_error": held.val[1],
        "held_loss": held.heldout[0],  # (n_H,) S-model on H
        "held_error": held.heldout[1],
        "cross_loss": held.reference_on_train[0],  # (n_S,) H-model on S
        "cross_error": held.reference_on_train[1],
        "test_loss": float(test_loss.mean()),
        "test_error": float(test_error.mean()),
        "gap_bound": outcome.bound.gap_bound,
        "risk_bound": outcome.bound.risk_bound,
        "seconds": sum(outcome.run.seconds.values()),
    }


def grid_trials(cfg: StudyConfig, data: Dataset) -> list[dict]:
    return [trial_row(cfg, data, lr, b) for lr in LEARNING_RATES for b in BATCH_SIZES]


def tpe_trials(cfg: StudyConfig, data: Dataset, n_trials: int) -> list[dict]:
    """A TPE study minimising the S-model's loss on H; diverged trials are pruned."""
    rows = []

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("learning_rate", 0.005, 0.2, log=True)
        b = trial.suggest_categorical("batch_size", list(BATCH_SIZES))
        rows.append(trial_row(cfg, data, lr, b))
        if rows[-1]["diverged"]:
            raise optuna.TrialPruned()
        return float(rows[-1]["held_loss"].mean())

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=5)
    optuna.create_study(sampler=sampler).optimize(objective, n_trials=n_trials)
    return rows


def source_version() -> str:
    """Hash of the grid and of the source that determines a trial (not ranking, report, CLI...)."""
    package = Path(hsgd_tune.__file__).resolve().parent
    names = (
        "train/twin.py",
        "train/models.py",
        "train/noise.py",
        "train/sketch.py",
        "data/datasets.py",
        "certify/estimates.py",
        "search/objective.py",
    )
    digest = hashlib.sha256(repr((LEARNING_RATES, BATCH_SIZES)).encode())
    for path in sorted([package / n for n in names] + list((package / "bound").glob("*.py"))):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def candidates(unit: tuple[str, int, str, Budget]) -> pd.DataFrame:
    """The trials of one (task, seed, set), from the cache or trained now."""
    task, seed, kind, budget = unit
    use_one_thread()
    cfg = study_config(task, seed, budget)
    extra = f"-t{budget.tpe_trials}" if kind == "tpe" else ""
    path = (
        RESULTS
        / "cache"
        / f"selection-{task}-s{seed}-{kind}{extra}-{cfg.fingerprint()}-{source_version()}.pkl"
    )
    if path.exists():
        return pd.read_pickle(path)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        data = load_dataset(cfg.data, cfg.seed)
    rows = grid_trials(cfg, data) if kind == "grid" else tpe_trials(cfg, data, budget.tpe_trials)
    table = pd.DataFrame(rows).assign(task=task, seed=seed, set=kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_pickle(path)
    print(
        f"  {task} seed {seed} {kind}: {len(table)} trials, {time.perf_counter() - started:.0f} s", flush=True
    )
    return table


# ---------------------------------------------------------------------------------------------
# The rules (pure functions of one seed's candidates)
# ---------------------------------------------------------------------------------------------


def heldout_certificate(errors: np.ndarray, n_candidates: int, task: str, loss_clip: float = 5.0) -> float:
    """kl⁻¹(ê, ln(T/δ)/n): an upper bound on the S-model's risk from its (n,) per-example errors on H
    (0-1 errors; for regression, losses clipped at B and divided by B), δ split over T candidates."""
    values = errors if task == "classification" else np.minimum(errors, loss_clip) / loss_clip
    return kl_inverse_upper(float(np.mean(values)), math.log(n_candidates / DELTA) / len(values))


def one_se_pick(estimate: np.ndarray, se: np.ndarray, prefer: np.ndarray) -> int:
    """Among trials whose ``estimate`` is at most best + SE(best), the smallest ``prefer`` (ties:
    the smaller estimate). All arrays (t,)."""
    best = int(np.argmin(estimate))
    admissible = np.flatnonzero(estimate <= estimate[best] + se[best])
    order = np.lexsort((estimate[admissible], prefer[admissible]))
    return int(admissible[order[0]])


def tolerance_pick(estimate: np.ndarray, prefer: np.ndarray, tolerance: float) -> int:
    """The landed rank rule: within ``tolerance``·|best| of the best estimate, the smallest ``prefer``."""
    best = estimate.min()
    admissible = np.flatnonzero(estimate <= best + tolerance * abs(best))
    order = np.lexsort((estimate[admissible], prefer[admissible]))
    return int(admissible[order[0]])


def _per_trial(estimate, *columns) -> tuple[np.ndarray, np.ndarray]:
    """``estimate`` (a hsgd_tune.certify.estimates function) of each trial's arrays: means (t,), SEs (t,)."""
    pairs = np.array([estimate(*arrays) for arrays in zip(*columns, strict=True)])  # (t, 2)
    return pairs[:, 0], pairs[:, 1]


def picks(trials: pd.DataFrame, n_val: int, task: str) -> dict[str, int]:
    """Row position (in ``trials``, finished trials only) each rule picks with ``n_val`` V rows."""
    val = [v[:n_val] for v in trials.val_loss]
    val_mean, _ = _per_trial(mean_se, val)
    peer_mean, peer_se = _per_trial(pooled_mean_se, val, trials.held_loss)  # the plain search's estimate
    held_mean, _ = _per_trial(mean_se, trials.held_loss)
    crossfit, crossfit_se = _per_trial(crossfit_mean_se, trials.held_loss, trials.cross_loss)
    crossfit_v = _per_trial(
        lambda v, h, c: crossfit_mean_se(np.concatenate([v, h]), c), val, trials.held_loss, trials.cross_loss
    )[0]
    errors = trials.held_error if task == "classification" else trials.held_loss
    cert = np.array([heldout_certificate(e, len(trials), task) for e in errors])
    gap = trials.gap_bound.to_numpy(dtype=float)
    return {
        "val (V)": int(np.argmin(val_mean)),
        PEER: int(np.argmin(peer_mean)),
        "heldout (H)": int(np.argmin(held_mean)),
        "crossfit": int(np.argmin(crossfit)),
        "crossfit+V": int(np.argmin(crossfit_v)),
        "heldout cert": int(np.argmin(cert)),
        "1-SE crossfit → gap bound": one_se_pick(crossfit, crossfit_se, gap),
        "1-SE crossfit → heldout cert": one_se_pick(crossfit, crossfit_se, cert),
        "1-SE V∪H → gap bound": one_se_pick(peer_mean, peer_se, gap),
        "old default": tolerance_pick(val_mean, trials.risk_bound.to_numpy(dtype=float), 0.05),
        "oracle": int(np.argmin(trials.test_loss.to_numpy())),
    }


def selections(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, set, seed, n_val, rule): the picked trial and its test loss and error."""
    rows = []
    for (task, kind, seed), one in trials.groupby(["task", "set", "seed"], sort=False):
        one = one[~one.diverged.astype(bool)].reset_index(drop=True)
        for n_val in VAL_SIZES:
            for rule, i in picks(one, n_val, task).items():
                pick = one.iloc[i]
                rows.append(
                    {
                        "task": task,
                        "set": kind,
                        "seed": seed,
                        "n_val": n_val,
                        "rule": rule,
                        "learning_rate": pick.learning_rate,
                        "batch_size": pick.batch_size,
                        "test_loss": pick.test_loss,
                        "test_error": pick.test_error,
                    }
                )
    return pd.DataFrame(rows)


def paired(diff: np.ndarray) -> tuple[float, float, float]:
    """Mean of paired differences (n,) and its 95 % t interval (NaN half-width when n < 2)."""
    n, mean = len(diff), float(np.mean(diff))
    if n < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, n - 1) * np.std(diff, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def comparison(picked: pd.DataFrame, baseline: str = PEER) -> pd.DataFrame:
    """Per (task, set, n_val, rule): Δ test loss against ``baseline`` (mean, 95 % interval), W/T/L."""
    keys = ["task", "set", "seed", "n_val"]
    base = picked[picked.rule == baseline].set_index(keys).test_loss
    out = []
    for (task, kind, n_val, rule), rows in picked.groupby(["task", "set", "n_val", "rule"], sort=False):
        diff = (rows.set_index(keys).test_loss - base.loc[rows.set_index(keys).index]).to_numpy()
        mean, low, high = paired(diff)
        out.append(
            {
                "task": task,
                "set": kind,
                "n_val": n_val,
                "rule": rule,
                "test_loss": rows.test_loss.mean(),
                "delta": mean,
                "low": low,
                "high": high,
                "win": int((diff < 0).sum()),
                "tie": int((diff == 0).sum()),
                "loss": int((diff > 0).sum()),
            }
        )
    return pd.DataFrame(out)


def overview(compared: pd.DataFrame, versus_v: pd.DataFrame) -> pd.DataFrame:
    """Per rule, over every (task, set, n_val) cell: how often its 95 % interval against the peer
    lies wholly above 0 (worse) or below 0 (better), the mean Δ; and against ``val (V)`` at n_val = 50."""
    small = versus_v[versus_v.n_val == min(VAL_SIZES)].groupby("rule", sort=False)
    rows = []
    for rule, cells in compared.groupby("rule", sort=False):
        if rule == PEER:
            continue
        v = small.get_group(rule)
        rows.append(
            {
                "rule": rule,
                "cells worse than peer": f"{int((cells.low > 0).sum())} of {len(cells)}",
                "cells better than peer": f"{int((cells.high < 0).sum())} of {len(cells)}",
                "mean Δ vs peer": f"{cells.delta.mean():+.4f}",
                "n_val=50: cells better than val (V)": f"{int((v.high < 0).sum())} of {len(v)}",
                "n_val=50: mean Δ vs val (V)": f"{v.delta.mean():+.4f}",
            }
        )
    return pd.DataFrame(rows)


def pooled(picked: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per (rule, n_val), over every task, candidate set and seed: the paired Δ test loss against
    ``baseline`` (mean, 95 % interval), the same relative to the baseline's test loss (tasks differ in
    scale), and win/tie/loss."""
    keys = ["task", "set", "seed", "n_val"]
    base = picked[picked.rule == baseline].set_index(keys).test_loss
    rows = []
    for (rule, n_val), one in picked.groupby(["rule", "n_val"], sort=False):
        if rule == baseline:
            continue
        one = one.set_index(keys).test_loss
        diff = (one - base.loc[one.index]).to_numpy()
        mean, low, high = paired(diff)
        rel, rel_low, rel_high = (100 * v for v in paired(diff / base.loc[one.index].to_numpy()))
        rows.append(
            {
                "rule": rule,
                "n_val": n_val,
                "Δ test loss": f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]",
                "relative Δ": f"{rel:+.1f} % [{rel_low:+.1f}, {rel_high:+.1f}]",
                "win / tie / loss": f"{(diff < 0).sum()} / {(diff == 0).sum()} / {(diff > 0).sum()}",
            }
        )
    return pd.DataFrame(rows).sort_values(["rule", "n_val"], key=_rule_order, kind="stable")


def _rule_order(column: pd.Series) -> pd.Series:
    """Sort rules in the order :func:`picks` lists them (other columns sort as they are)."""
    if column.name != "rule":
        return column
    return column.map({name: i for i, name in enumerate(RULES)})


def tables(compared: pd.DataFrame) -> str:
    """Markdown: one table per (task, set); a row per rule, a column per n_val."""
    sections = []
    for (task, kind), one in compared.groupby(["task", "set"], sort=False):
        peer = one[one.rule == PEER].set_index("n_val").test_loss
        wide = {}
        for row in one.itertuples(index=False):
            cell = f"{row.delta:+.4f} [{row.low:+.4f}, {row.high:+.4f}] {row.win}/{row.tie}/{row.loss}"
            wide.setdefault(row.rule, {"rule": row.rule})[f"n_val = {row.n_val}"] = (
                f"{peer[row.n_val]:.4f} (peer's test loss)" if row.rule == PEER else cell
            )
        sections.append(f"**{task}, {kind}**\n\n{markdown(pd.DataFrame(list(wide.values())))}\n")
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, 300 steps, 12 TPE trials")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--sets", nargs="+", default=["grid", "tpe"], choices=["grid", "tpe"])
    parser.add_argument("--seeds", type=int, help="number of seeds (default 10, or 3 with --quick)")
    parser.add_argument("--steps", type=int, help="SGD steps per trial (default 600, or 300 with --quick)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (1 torch thread each)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    budget = Budget(
        steps=args.steps or budget.steps,
        seeds=args.seeds or budget.seeds,
        tpe_trials=budget.tpe_trials,
        n_test_synthetic=budget.n_test_synthetic,
    )
    clock = Clock()
    units = [(t, s, k, budget) for t in args.tasks for s in range(budget.seeds) for k in args.sets]
    if args.jobs > 1:
        with get_context("spawn").Pool(args.jobs) as pool:
            parts = pool.map(candidates, units, chunksize=1)
    else:
        parts = [candidates(u) for u in units]
    trials = pd.concat(parts, ignore_index=True)
    picked = selections(trials)
    compared = comparison(picked)
    versus_v = comparison(picked, baseline="val (V)")
    suffix = "-quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    picked.to_csv(RESULTS / f"selection{suffix}-picks.csv", index=False)
    compared.to_csv(RESULTS / f"selection{suffix}-summary.csv", index=False)
    diverged = trials.groupby(["task", "set"]).diverged.agg(lambda d: f"{int(d.sum())} of {len(d)}")
    command = "python -m benchmarks.selection " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (
        header("Selection at equal data", command.strip(), clock.seconds())
        + f"- budget: {budget.seeds} seeds, {budget.steps} steps, grid 6 × 4, "
        + f"TPE {budget.tpe_trials} trials\n"
        + "- diverged (not candidates): "
        + ", ".join(f"{t} {k} {v}" for (t, k), v in diverged.items())
        + "\n- cell: mean Δ test loss vs the peer (val on V ∪ H) [paired 95 % interval] win/tie/loss\n\n"
        + "**Overview** (a cell: one task, candidate set and n_val; worse/better: the paired 95 % "
        + "interval lies wholly above/below 0)\n\n"
        + markdown(overview(compared, versus_v))
        + "\n\n**Pooled over the 4 tasks and 2 candidate sets** (80 paired picks per row), against the "
        + f"peer\n\n{markdown(pooled(picked, PEER))}\n\n**The same against val (V)**\n\n"
        + markdown(pooled(picked, "val (V)"))
        + "\n\n"
        + tables(compared)
    )
    (RESULTS / f"selection{suffix}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
