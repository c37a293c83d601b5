"""Does picking with the advisor beat picking by validation loss alone? (issue #6, item 2)

For each seed (one study: its own splits, initialisation and minibatches), the lr × batch-size grid of
``benchmarks.common`` is trained once; validation sets of 50, 100 and 200 examples are the first 50,
100 and 200 rows of the seed's 200-row V (validation never affects training, so the trials are the
same for every size). Each rule picks one trial; we report the test loss and error of its final
S-model on T (597 digits rows; 20 000 synthetic rows):

- ``val loss``: the smallest validation loss (what a plain search does);
- ``advisor (1 SE)``: among trials whose validation loss is at most best + SE, the smallest risk bound,
  SE = sd(per-example validation losses of the best trial) / sqrt(n_val) — trials the validation set
  cannot tell apart from the best, ordered by the bound (the "one standard error rule");
- ``advisor (+10%)``: the same with a fixed tolerance, validation loss ≤ 1.1 × best;
- ``bound only``: the smallest risk bound, ignoring validation (a reference: what the bound does alone);
- ``oracle``: the smallest test loss (the best any rule could do on this grid).

Win rate: the share of seeds where the rule's pick has a strictly smaller test loss than the
``val loss`` pick; "tie" is the same trial (or an equal test loss).

    python -m benchmarks.selection            # full: 6 × 4 grid, 10 seeds, 1000 steps
    python -m benchmarks.selection --quick    # 6 × 4 grid, 3 seeds, 300 steps
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from benchmarks.common import DATASETS, RESULTS, Budget, Clock, grid, header, markdown, use_one_thread

FULL = Budget(steps=1000, record_every=25, seeds=10, n_test_synthetic=20000)
QUICK = Budget(steps=300, record_every=25, seeds=3, n_test_synthetic=5000)
VAL_SIZES = (50, 100, 200)
RELATIVE_TOLERANCE = 0.10


def one_se_tolerance(val_losses: np.ndarray) -> float:
    """Standard error of the mean of one trial's per-example validation losses (n,)."""
    return float(np.std(val_losses, ddof=1) / np.sqrt(len(val_losses)))


def advisor_pick(val_loss: np.ndarray, bound: np.ndarray, tolerance: float) -> int:
    """Index of the smallest ``bound`` among trials with ``val_loss <= min(val_loss) + tolerance``.

    val_loss, bound: (t,) over the completed trials. Ties in the bound go to the smaller val loss.
    """
    admissible = np.flatnonzero(val_loss <= val_loss.min() + tolerance)
    order = np.lexsort((val_loss[admissible], bound[admissible]))
    return int(admissible[order[0]])


def picks(trials: pd.DataFrame, n_val: int) -> dict[str, int]:
    """Row position (in ``trials``) each rule picks with the first ``n_val`` validation examples."""
    per_example = np.stack([v[:n_val] for v in trials.val_losses])  # (t, n_val)
    val_loss = per_example.mean(axis=1)
    bound = trials["bound/risk_bound"].to_numpy()
    best = int(np.argmin(val_loss))
    return {
        "val loss": best,
        "advisor (1 SE)": advisor_pick(val_loss, bound, one_se_tolerance(per_example[best])),
        "advisor (+10%)": advisor_pick(val_loss, bound, RELATIVE_TOLERANCE * val_loss[best]),
        "bound only": int(np.argmin(bound)),
        "oracle": int(np.argmin(trials.test_loss.to_numpy())),
    }


def selections(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (seed, n_val, rule): the picked trial and its test loss and error."""
    rows = []
    for seed, one in trials.groupby("seed"):
        one = one.reset_index(drop=True)
        for n_val in VAL_SIZES:
            for rule, i in picks(one, n_val).items():
                pick = one.iloc[i]
                rows.append(
                    {
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


def summary(picked: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd of test loss and error per (n_val, rule), and win/tie/loss against ``val loss``."""
    base = picked[picked.rule == "val loss"].set_index(["seed", "n_val"])
    out = []
    for (n_val, rule), rows in picked.groupby(["n_val", "rule"], sort=False):
        rows = rows.set_index(["seed", "n_val"])
        diff = rows.test_loss - base.test_loss.loc[rows.index]
        out.append(
            {
                "n_val": n_val,
                "rule": rule,
                "test loss": f"{rows.test_loss.mean():.3f} ± {rows.test_loss.std(ddof=1):.3f}",
                "test error": f"{rows.test_error.mean():.3f} ± {rows.test_error.std(ddof=1):.3f}",
                "Δ loss vs val": f"{diff.mean():+.3f}",
                "win / tie / loss": f"{(diff < 0).sum()} / {(diff == 0).sum()} / {(diff > 0).sum()}",
            }
        )
    return pd.DataFrame(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, 300 steps: a few minutes")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, help="number of seeds (default 10, or 3 with --quick)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    n_seeds = args.seeds or budget.seeds
    use_one_thread()
    clock = Clock()
    sections = []
    for dataset in args.datasets:
        trials = pd.concat([grid(dataset, s, budget) for s in range(n_seeds)], ignore_index=True)
        picked = selections(trials[~trials.diverged])
        name = f"selection-{dataset}{'-quick' if args.quick else ''}"
        RESULTS.mkdir(exist_ok=True)
        picked.to_csv(RESULTS / f"{name}-picks.csv", index=False)
        sections.append(
            f"**{dataset}** ({n_seeds} seeds, {budget.steps} steps; {int(trials.diverged.sum())} of "
            f"{len(trials)} trials diverged and were not candidates)\n\n{markdown(summary(picked))}\n"
        )
    command = "python -m benchmarks.selection " + " ".join(sys.argv[1:] if argv is None else argv)
    text = header("Selection", command.strip(), clock.seconds()) + "\n" + "\n".join(sections)
    (RESULTS / f"selection{'-quick' if args.quick else ''}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
