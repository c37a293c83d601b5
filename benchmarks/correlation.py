"""Does the bound rank trials like the observed generalization gap does? (issue #6, item 1)

For an lr × batch-size grid and several seeds, on digits and on the synthetic teacher task, this
computes Kendall's τ and the granulated Kendall Ψ (``hsgd_tune.advise.correlation``; Jiang et al. 2020, §3)
between each measure and the observed gap, for two gaps of the S-model:

- final: test loss − train loss (full S, raw cross-entropy) at the last iterate;
- trajectory-wide: the max of that gap over the recorded iterates (what the bound G is about).

τ and Ψ are computed within each seed (a seed is a separate study: its own splits, initialisation and
minibatches) and reported as mean ± standard deviation over seeds. Diverged trials are dropped.

    python -m benchmarks.correlation            # full: 6 × 4 grid, 3 seeds, 1000 steps, + certificate, α̂
    python -m benchmarks.correlation --quick    # 6 × 4 grid, 2 seeds, 300 steps, bound and baselines only
    python -m benchmarks.correlation --no-extras --seeds 5   # full length, without certificate and α̂
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import numpy as np
import pandas as pd

from benchmarks.common import (
    DATASETS,
    EXTRA_PREFIXES,
    RESULTS,
    Budget,
    Clock,
    grid,
    header,
    markdown,
    use_one_thread,
)
from hsgd_tune.advise.correlation import granulated_kendall, kendall_tau

FULL = Budget(steps=1000, record_every=25, seeds=3, n_test_synthetic=20000, extras=True)
QUICK = Budget(steps=300, record_every=25, seeds=2, n_test_synthetic=5000)

#: Measures from the bound engine, in the order of the table; ``certificate/…`` and ``tail/…``
#: columns are appended when the trials report them, then the baselines.
BOUND_MEASURES = (
    "bound/risk_bound",
    "bound/gap_bound",
    "bound/risk_bound_uniform",
    "bound/gap_bound_uniform",
    "bound/decoupling_distance",
    "bound/synchronous_distance",
    "bound/lipschitz",
    "bound/lipschitz_pop",
    "bound/complexity",
)
BASELINES = ("lr_over_b", "weight_norm", "dist_from_init", "val_loss")
GAPS = {"final": "gap_final", "traj": "gap_traj"}
HPARAMS = ["learning_rate", "batch_size"]


def measure_columns(trials: pd.DataFrame) -> list[str]:
    """Bound terms, then every extra metric that varies across trials, then the baselines.

    Extras that are the same for every trial (settings such as ``certificate/mc_samples``) and the
    per-checkpoint tail indices (``tail/alpha_step_…``; ``tail/alpha`` is their median) are left out.
    """
    extras = sorted(
        c
        for c in trials.columns
        if c.startswith(EXTRA_PREFIXES) and "_step_" not in c and trials[c].nunique(dropna=True) > 1
    )
    return [*BOUND_MEASURES, *extras, *BASELINES]


def scores(trials: pd.DataFrame) -> pd.DataFrame:
    """τ, Ψ and ψ_i of every measure against both gaps, one row per (seed, measure, gap)."""
    rows = []
    for seed, one in trials.groupby("seed"):
        for measure in measure_columns(trials):
            for gap_name, gap_col in GAPS.items():
                big_psi, psi = granulated_kendall(one[measure], one[gap_col], one[HPARAMS])
                rows.append(
                    {
                        "seed": seed,
                        "measure": measure,
                        "gap": gap_name,
                        "tau": kendall_tau(one[measure], one[gap_col]),
                        "Psi": big_psi,
                        **{f"psi_{k}": v for k, v in psi.items()},
                    }
                )
    return pd.DataFrame(rows)


def summary(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over seeds, one row per measure, columns per gap."""

    def cell(values: pd.Series) -> str:
        v = values.dropna()
        if v.empty:
            return "—"
        return f"{v.mean():+.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():+.2f}"

    out = []
    for measure, rows in per_seed.groupby("measure", sort=False):
        final, traj = rows[rows.gap == "final"], rows[rows.gap == "traj"]
        out.append(
            {
                "measure": measure,
                "τ (final)": cell(final.tau),
                "Ψ (final)": cell(final.Psi),
                "ψ_lr (final)": cell(final.psi_learning_rate),
                "ψ_b (final)": cell(final.psi_batch_size),
                "τ (traj)": cell(traj.tau),
                "Ψ (traj)": cell(traj.Psi),
            }
        )
    return pd.DataFrame(out)


def trial_overview(trials: pd.DataFrame) -> str:
    ok = trials[~trials.diverged]
    return (
        f"{len(trials)} trials, {int(trials.diverged.sum())} diverged; "
        f"final gap {ok.gap_final.min():.3f} … {ok.gap_final.max():.3f}, "
        f"trajectory-wide gap {ok.gap_traj.min():.3f} … {ok.gap_traj.max():.3f}, "
        f"risk bound {ok['bound/risk_bound'].min():.2f} … {ok['bound/risk_bound'].max():.2f} "
        f"(below B in {below_b(ok, 'bound/risk_bound')}; the uniform form "
        f"{ok['bound/risk_bound_uniform'].min():.1f} … {ok['bound/risk_bound_uniform'].max():.1f}, "
        f"below B in {below_b(ok, 'bound/risk_bound_uniform')}), "
        f"test error {ok.test_error.min():.3f} … {ok.test_error.max():.3f}; "
        f"median {ok.seconds.median():.1f} s per trial"
    )


def below_b(trials: pd.DataFrame, column: str) -> str:
    """How many trials have a risk bound below B, i.e. say something about the clipped risk."""
    below = int((trials[column] < trials["bound/loss_clip"]).sum())
    return f"{below}/{len(trials)} trials ({below / len(trials):.0%})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 300 steps: a few minutes")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3, or 2 with --quick)")
    parser.add_argument("--no-extras", action="store_true", help="skip the PAC-Bayes certificate and α̂")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    if args.no_extras:
        budget = dataclasses.replace(budget, extras=False)
    n_seeds = args.seeds or budget.seeds
    use_one_thread()
    clock = Clock()
    suffix = "-quick" if args.quick else "" if budget.extras else "-no-extras"
    sections = []
    for dataset in args.datasets:
        trials = pd.concat([grid(dataset, s, budget) for s in range(n_seeds)], ignore_index=True)
        ok = trials[~trials.diverged].copy()
        per_seed = scores(ok)
        name = f"correlation-{dataset}{suffix}"
        RESULTS.mkdir(exist_ok=True)
        trials.drop(columns="val_losses").to_csv(RESULTS / f"{name}-trials.csv", index=False)
        per_seed.to_csv(RESULTS / f"{name}-per-seed.csv", index=False)
        sections.append(
            f"**{dataset}** ({n_seeds} seeds, {budget.steps} steps, record every {budget.record_every}"
            f"{', with certificate and α̂' if budget.extras else ''}): "
            f"{trial_overview(trials)}\n\n{markdown(summary(per_seed))}\n"
        )
    command = "python -m benchmarks.correlation " + " ".join(sys.argv[1:] if argv is None else argv)
    text = header("Correlation", command.strip(), clock.seconds()) + "\n" + "\n".join(sections)
    (RESULTS / f"correlation{suffix}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
