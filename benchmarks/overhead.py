"""What does the bound cost? A trial of ours against a plain single training run, side by side.

For each batch size the same model (the quick-start MLP on digits, same steps) is trained

- *plain*: one Optuna trial around an ``nn.Module`` + ``torch.optim.SGD`` loop (no twin, no bound,
  no MLflow) — what a user would run without the advisor;
- *ours*: one trial of :class:`hsgd_tune.objective.Objective` in a study stored as the quick-start's
  is (Optuna journal file, MLflow SQLite with artifacts, in a temporary folder): twin run, gradient
  norms, bound, logging; the certificate and diagnostics as the quick-start has them (after the study,
  for the Pareto front), and with ``--every-trial-diagnostics`` also inside every trial,

interleaved repetition by repetition (these machines are noisy), and for 1 and 2 torch threads.
Reports medians, the ratio ours/plain, the split of our trial (training, gradient norms, bound,
logging, other = run creation, Optuna, sampling), bookkeeping (logging + other) as a share of our
trial, the bytes of recorded trajectories, and the old per-iterate ``vmap(grad)`` gradient norms next
to the closed form on the same trajectories.

    python benchmarks/overhead.py            # 1000 steps, 5 repetitions
    python benchmarks/overhead.py --quick    # 300 steps, 3 repetitions (a minute or two)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import optuna
import torch
from torch import nn

from hsgd_tune.config import load_study
from hsgd_tune.data import load_dataset
from hsgd_tune.models import build_model, model_spec
from hsgd_tune.objective import Objective, evaluate
from hsgd_tune.study import open_storage
from hsgd_tune.tracking import Tracker
from hsgd_tune.training import _vmap_gradient_norms, clipped_gradient_norms, minibatch_positions

QUICKSTART = Path(__file__).resolve().parent.parent / "studies" / "quickstart.toml"
BATCH_SIZES = (8, 32, 128)
LEARNING_RATE = 0.05


def plain_trial(data, spec, steps: int, batch_size: int, seed: int) -> float:
    """Seconds for one Optuna trial that trains one model with torch.optim.SGD, nothing else."""
    x, y = torch.as_tensor(data.train.x), torch.as_tensor(data.train.y)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("learning_rate", LEARNING_RATE, LEARNING_RATE)
        torch.manual_seed(seed)
        model = build_model(spec)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        loss_fn = nn.CrossEntropyLoss()
        for pos in minibatch_positions(len(y), batch_size, steps, seed):
            idx = torch.as_tensor(pos)
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(loss_fn(model(torch.as_tensor(data.val.x)), torch.as_tensor(data.val.y)))

    study = optuna.create_study()
    started = time.perf_counter()
    study.optimize(objective, n_trials=1)
    return time.perf_counter() - started


def our_trial(cfg, data, tracker: Tracker, study: optuna.Study, batch_size: int) -> dict:
    """Seconds for one trial of our Objective in a journal-stored study (the quick-start's storage),
    and its MLflow run (``timing_split`` reads the split from it)."""
    exp = tracker.experiment_id(cfg.experiment_name)
    parent = tracker.open_parent(exp, cfg.name, params={}, tags={})
    objective = Objective(cfg, data, tracker, exp, parent)
    study.enqueue_trial({"learning_rate": LEARNING_RATE, "batch_size": batch_size})
    started = time.perf_counter()
    study.optimize(objective, n_trials=1)
    return {"total": time.perf_counter() - started, "run_id": study.trials[-1].user_attrs["mlflow_run_id"]}


def timing_split(tracker: Tracker, timed: dict) -> dict[str, float]:
    """The trial's split as it logged it: training, gradient norms, bound, diagnostics, logging."""
    metrics = tracker.client.get_run(timed["run_id"]).data.metrics
    split = {
        k: metrics.get(f"time/{k}_s", 0.0)
        for k in ("training", "lipschitz", "bound", "diagnostics", "logging")
    }
    other = timed["total"] - sum(split.values())  # MLflow run creation and params, Optuna, sampling
    return {**timed, **split, "other": other, "trajectory_bytes": metrics["train/trajectory_bytes"]}


def diagnosing_every_trial(cfg):
    """The study with certificate and diagnostics inside every trial."""
    return dataclasses.replace(cfg, diagnostics=dataclasses.replace(cfg.diagnostics, trials="all"))


def print_table(plain: dict[tuple, list[float]], ours: dict[tuple, list[dict]], variants: list[str]) -> None:
    """Medians per (threads, batch): plain, each variant and its ratio, and the split of "ours"."""
    columns = ["threads", "batch", "plain trial (s)"]
    for name in variants:
        columns += [f"{name} (s)", "ratio"]
    columns += ["training", "grad norms", "bound", "logging", "other", "bookkeeping", "trajectories (KiB)"]
    print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for (threads, b), times in sorted(plain.items()):
        p_med = statistics.median(times)
        cells = [str(threads), str(b), f"{p_med:.3f}"]
        for name in variants:
            total = statistics.median(r["total"] for r in ours[(name, threads, b)])
            cells += [f"{total:.3f}", f"{total / p_med:.2f}"]
        rows = ours[(variants[0], threads, b)]
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        # Bookkeeping: what Optuna and MLflow add to a trial (logging, run creation, storage writes).
        bookkeeping = statistics.median((r["logging"] + r["other"]) / r["total"] for r in rows)
        cells += [f"{med[k]:.3f}" for k in ("training", "lipschitz", "bound", "logging", "other")]
        cells += [f"{bookkeeping:.0%}", f"{med['trajectory_bytes'] / 1024:.0f}"]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 steps, 3 repetitions")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", default="1,2", help="torch thread counts to compare, e.g. 1,2")
    ap.add_argument(
        "--every-trial-diagnostics",
        action="store_true",
        help="also time trials with [diagnostics] trials = 'all' (certificate, tail index, analytic)",
    )
    args = ap.parse_args()
    steps = 300 if args.quick else 1000
    repeats = args.repeats or (3 if args.quick else 5)
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    base = load_study(QUICKSTART)
    cfg = dataclasses.replace(base, training=dataclasses.replace(base.training, steps=steps))
    data = load_dataset(cfg.data, cfg.seed)
    spec = model_spec(cfg.model, data.n_features, data.n_outputs, {})
    print(
        f"# overhead: {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}; quick-start MLP {cfg.model.widths}, {steps} steps, "
        f"record_every {cfg.training.record_every}, {repeats} interleaved repetitions"
    )
    variants = {"ours": cfg}  # as the quick-start has it: certificate after the study
    if args.every_trial_diagnostics:
        variants["ours, diagnostics every trial"] = diagnosing_every_trial(cfg)

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # MLflow and Optuna state of this benchmark stay out of the user's mlruns/
        tracker = Tracker()
        studies = {
            name: optuna.create_study(
                study_name=name,
                storage=open_storage(None),
                directions=["minimize"] * len(cfg.objectives),
            )
            for name in variants
        }
        plain: dict[tuple, list[float]] = {}
        ours: dict[tuple, list[dict]] = {}
        for rep in range(repeats):
            for threads in [int(t) for t in args.threads.split(",")]:
                torch.set_num_threads(threads)
                for b in BATCH_SIZES:
                    runs = ["plain", *variants]
                    for who in runs if rep % 2 == 0 else runs[::-1]:  # alternate who goes first
                        if who == "plain":
                            plain.setdefault((threads, b), []).append(
                                plain_trial(data, spec, steps, b, cfg.seed)
                            )
                        else:
                            timed = our_trial(variants[who], data, tracker, studies[who], b)
                            ours.setdefault((who, threads, b), []).append(timed)
        ours = {key: [timing_split(tracker, t) for t in timed] for key, timed in ours.items()}
        print_table(plain, ours, list(variants))

        # The gradient norms before and after: old per-iterate vmap(grad) vs closed form, same input.
        torch.set_num_threads(2)
        outcome = evaluate(cfg, data, {"learning_rate": LEARNING_RATE, "batch_size": 32})
        traj, model = outcome.run.trajectories, outcome.run.model
        args_ = (data, cfg.bound.loss_clip, cfg.bound.lipschitz_subsample, cfg.seed)
        new_t, old_t = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            new = clipped_gradient_norms(model, traj, *args_)
            new_t.append(time.perf_counter() - started)
            started = time.perf_counter()
            old = _vmap_gradient_norms(model, traj, *args_)
            old_t.append(time.perf_counter() - started)
        print(
            f"\ngradient norms of {traj.shape[0] * traj.shape[1]} iterates x {cfg.bound.lipschitz_subsample} "
            f"examples (2 threads): vmap(grad) per iterate {statistics.median(old_t):.2f} s, closed form "
            f"{statistics.median(new_t):.3f} s, max |difference| {np.abs(new - old).max():.1e}"
        )
        os.chdir("/")


if __name__ == "__main__":
    main()
