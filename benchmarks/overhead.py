"""What does the bound cost? A trial of ours against a plain single training run, side by side.

For each model (the quick-start MLP, the CNN of ``studies/cnn_digits.toml``, and an entry-point tanh MLP
from ``benchmarks/user_models.py``) and batch size, the same model on digits, same steps, is trained

- *plain*: one Optuna trial around an ``nn.Module`` + ``torch.optim.SGD`` loop (no twin, no bound,
  no MLflow) — what a user would run without the advisor;
- *ours*: one trial of :class:`hsgd_tune.search.objective.Objective` in a study stored as the quick-start's
  is (Optuna journal file, MLflow SQLite with artifacts, in a temporary folder): twin run, gradient
  norms, bound, logging; the certificate and diagnostics as the quick-start has them (after the study,
  for the Pareto front), and with ``--every-trial-diagnostics`` also inside every trial,

interleaved repetition by repetition (these machines are noisy), for each torch thread count. The
study's experiment and parent run are opened once, before any timing, as a study does.

Reported: medians, the ratio ours/plain, the split of our trial (training, gradient norms, bound,
logging, other = run creation, Optuna, sampling), bookkeeping (logging + other) as a share of our trial,
how the twin was stepped, and a breakdown of every Optuna storage and MLflow client call a quick-start
trial makes (calls and milliseconds per trial), then the old per-iterate ``vmap(grad)`` gradient norms
next to the closed form on the same trajectories.

    python benchmarks/overhead.py            # 1000 steps, 5 repetitions, 1 thread
    python benchmarks/overhead.py --quick    # 300 steps, 3 repetitions (a minute or two)
    python benchmarks/overhead.py --threads 1,2 --models mlp

``--threads`` sets torch's threads and NumPy's BLAS threads (:func:`set_threads`) for both trials.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import optuna
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks.user_models, as an entry point

from hsgd_tune.data.datasets import load_dataset  # noqa: E402
from hsgd_tune.search.objective import Objective, evaluate  # noqa: E402
from hsgd_tune.search.storage import open_storage  # noqa: E402
from hsgd_tune.studyfile.config import ModelConfig, load_study  # noqa: E402
from hsgd_tune.track.tracker import Tracker  # noqa: E402
from hsgd_tune.train.models import build_model, model_spec  # noqa: E402
from hsgd_tune.train.twin import (  # noqa: E402
    _vmap_gradient_norms,
    clipped_gradient_norms,
    minibatch_positions,
    per_example_loss,
)

QUICKSTART = REPO / "studies" / "quickstart.toml"
CNN_STUDY = REPO / "studies" / "cnn_digits.toml"
BATCH_SIZES = (8, 32, 128)
LEARNING_RATE = 0.05
MODELS = ("mlp", "cnn", "entry")


def model_config(name: str, steps: int):
    """The quick-start study with the model ``name`` and ``steps`` steps."""
    cfg = load_study(QUICKSTART)
    if name == "cnn":
        cfg = dataclasses.replace(cfg, model=load_study(CNN_STUDY).model)
    if name == "entry":
        model = ModelConfig(kind="entry_point", widths=(), entry_point="benchmarks.user_models:tanh_mlp")
        cfg = dataclasses.replace(cfg, model=model)
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, steps=steps))


def set_threads(threads: int) -> None:
    """Torch's intra-op threads and NumPy's BLAS threads (threadpoolctl), for plain and ours alike:
    on a busy 2-core machine OpenBLAS's default two threads spin, and made the NumPy products of the
    bound's nearest-iterate search take 0.3 s of an entry-point trial instead of 0.01 s."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")  # process-wide until changed again


def plain_trial(data, spec, steps: int, batch_size: int, seed: int) -> float:
    """Seconds for one Optuna trial that trains one model with torch.optim.SGD, nothing else."""
    x, y = torch.as_tensor(data.train.x), torch.as_tensor(data.train.y)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("learning_rate", LEARNING_RATE, LEARNING_RATE)
        torch.manual_seed(seed)
        model = build_model(spec)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for pos in minibatch_positions(len(y), batch_size, steps, seed):
            idx = torch.as_tensor(pos)
            opt.zero_grad()
            loss = per_example_loss(model(x[idx]), y[idx], data.task).mean()
            loss.backward()
            opt.step()
        with torch.no_grad():
            val = torch.as_tensor(data.val.y)
            return float(per_example_loss(model(torch.as_tensor(data.val.x)), val, data.task).mean())

    study = optuna.create_study()
    started = time.perf_counter()
    study.optimize(objective, n_trials=1)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# Counting every Optuna storage and MLflow client call
# ---------------------------------------------------------------------------------------------


class CallLog:
    """Calls and seconds of every public method of the given classes, outermost calls only (an MLflow
    method calling another is counted once). ``take()`` returns and clears what was logged."""

    def __init__(self):
        self.calls: dict[str, list[float]] = collections.defaultdict(list)
        self.depth = 0

    def install(self, cls: type, prefix: str, names: list[str] | None = None) -> None:
        for name in names or [n for n in vars(cls) if not n.startswith("_")]:
            method = getattr(cls, name)
            if callable(method) and not isinstance(method, (type, staticmethod, classmethod, property)):
                setattr(cls, name, self._timed(method, f"{prefix}.{name}"))

    def _timed(self, method, label: str):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            self.depth += 1
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.calls[label].append(time.perf_counter() - started)

        return timed

    def take(self) -> dict[str, list[float]]:
        calls, self.calls = dict(self.calls), collections.defaultdict(list)
        return calls


def install_call_log() -> CallLog:
    from mlflow import MlflowClient
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    log = CallLog()
    log.install(MlflowClient, "mlflow")
    log.install(JournalStorage, "optuna")
    log.install(
        JournalFileBackend, "optuna journal", ["append_logs"]
    )  # hsgd_tune.search.study.set_user_attrs
    return log


# ---------------------------------------------------------------------------------------------
# Our trial
# ---------------------------------------------------------------------------------------------


class OurTrials:
    """One study (journal) + MLflow experiment and parent run per config, opened once."""

    def __init__(self, tracker: Tracker, calls: CallLog):
        self.tracker, self.calls, self.studies = tracker, calls, {}

    def run(self, key: str, cfg, data, batch_size: int) -> dict:
        if key not in self.studies:
            exp = self.tracker.experiment_id(cfg.experiment_name + "-" + key)
            parent = self.tracker.open_parent(exp, cfg.name, params={}, tags={})
            study = optuna.create_study(
                study_name=key, storage=open_storage(None), directions=["minimize"] * len(cfg.objectives)
            )
            self.studies[key] = (study, Objective(cfg, data, self.tracker, exp, parent))
        study, objective = self.studies[key]
        study.enqueue_trial({"learning_rate": LEARNING_RATE, "batch_size": batch_size})
        self.calls.take()
        started = time.perf_counter()
        study.optimize(objective, n_trials=1)
        total = time.perf_counter() - started
        trial = study.trials[-1]
        return {"total": total, "run_id": trial.user_attrs["mlflow_run_id"], "calls": self.calls.take()}


def timing_split(tracker: Tracker, timed: dict) -> dict:
    """The trial's split as it logged it: training, gradient norms, bound, diagnostics, logging."""
    run = tracker.client.get_run(timed["run_id"])
    metrics = run.data.metrics
    split = {
        k: metrics.get(f"time/{k}_s", 0.0)
        for k in ("training", "lipschitz", "bound", "diagnostics", "logging")
    }
    other = timed["total"] - sum(split.values())  # MLflow run creation and params, Optuna, sampling
    calls = sum(sum(v) for v in timed["calls"].values())
    return {
        **timed,
        **split,
        "other": other,
        "calls_s": calls,
        "trajectory_bytes": metrics["train/trajectory_bytes"],
        "twin": run.data.tags.get("hsgd.twin_step", "?"),
    }


def diagnosing_every_trial(cfg):
    """The study with certificate and diagnostics inside every trial."""
    return dataclasses.replace(cfg, diagnostics=dataclasses.replace(cfg.diagnostics, trials="all"))


def print_table(plain: dict[tuple, list[float]], ours: dict[tuple, list[dict]], variants: list[str]) -> None:
    """Medians per (model, threads, batch): plain, each variant and its ratio, and the split of "ours"."""
    columns = ["model", "threads", "batch", "plain trial (s)"]
    for name in variants:
        columns += [f"{name} (s)", "ratio"]
    columns += ["training", "grad norms", "bound", "logging", "other", "bookkeeping", "Optuna+MLflow calls"]
    columns += ["twin step"]
    print("\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for (model, threads, b), times in plain.items():
        p_med = statistics.median(times)
        cells = [model, str(threads), str(b), f"{p_med:.3f}"]
        for name in variants:
            total = statistics.median(r["total"] for r in ours[(name, model, threads, b)])
            cells += [f"{total:.3f}", f"{total / p_med:.2f}"]
        rows = ours[(variants[0], model, threads, b)]
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], float)}
        # Bookkeeping: what Optuna and MLflow add to a trial (logging, run creation, storage writes).
        bookkeeping = statistics.median((r["logging"] + r["other"]) / r["total"] for r in rows)
        calls = statistics.median(r["calls_s"] / r["total"] for r in rows)
        cells += [f"{med[k]:.3f}" for k in ("training", "lipschitz", "bound", "logging", "other")]
        cells += [f"{bookkeeping:.0%}", f"{calls:.0%}", rows[0]["twin"]]
        print("| " + " | ".join(cells) + " |")


def print_calls(rows: list[dict], label: str) -> None:
    """Every Optuna storage and MLflow client call of a trial: calls and milliseconds (medians)."""
    names = sorted({n for r in rows for n in r["calls"]})
    per = {
        n: (
            statistics.median(len(r["calls"].get(n, [])) for r in rows),
            statistics.median(1000 * sum(r["calls"].get(n, [])) for r in rows),
        )
        for n in names
    }
    total = statistics.median(r["total"] for r in rows) * 1000
    print(f"\nOptuna and MLflow calls of one trial ({label}; our trial {total:.0f} ms, medians):\n")
    print("| call | calls | ms | share of the trial |\n|---|---|---|---|")
    for name, (count, ms) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {count:g} | {ms:.1f} | {ms / total:.1%} |")
    all_ms = statistics.median(1000 * r["calls_s"] for r in rows)
    print(f"| all | {sum(c for c, _ in per.values()):g} | {all_ms:.1f} | {all_ms / total:.1%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="300 steps, 3 repetitions")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", default="1", help="torch (and BLAS) thread counts to compare, e.g. 1,2")
    ap.add_argument("--models", default=",".join(MODELS), help=f"any of {', '.join(MODELS)}")
    ap.add_argument(
        "--every-trial-diagnostics",
        action="store_true",
        help="also time trials with [diagnostics] trials = 'all' (certificate, tail index, analytic)",
    )
    args = ap.parse_args()
    steps = 300 if args.quick else 1000
    repeats = args.repeats or (3 if args.quick else 5)
    models = args.models.split(",")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    calls = install_call_log()

    configs = {name: model_config(name, steps) for name in models}
    data = load_dataset(configs[models[0]].data, configs[models[0]].seed)  # all: the quick-start's digits
    specs = {
        name: model_spec(cfg.model, data.n_features, data.n_outputs, {}) for name, cfg in configs.items()
    }
    print(
        f"# overhead: {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(load average {os.getloadavg()[0]:.1f} at start), torch {torch.__version__}; {steps} steps, "
        f"record_every {configs[models[0]].training.record_every}, {repeats} interleaved repetitions; "
        "models: mlp = quick-start MLP (64, 64), cnn = studies/cnn_digits.toml, entry = "
        "benchmarks/user_models.py:tanh_mlp"
    )
    variants = ["ours"] + (["ours, diagnostics every trial"] if args.every_trial_diagnostics else [])

    def variant_cfg(variant: str, model: str):
        cfg = configs[model]
        return diagnosing_every_trial(cfg) if variant != "ours" else cfg

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # MLflow and Optuna state of this benchmark stay out of the user's mlruns/
        trials = OurTrials(Tracker(), calls)
        thread_counts = [int(t) for t in args.threads.split(",")]
        set_threads(thread_counts[0])
        for model in models:  # warm-up, untimed: first imports (torch.func), MLflow tables, caches
            plain_trial(data, specs[model], 20, 32, 0)
            for variant in variants:
                trials.run(f"{variant}/{model}", variant_cfg(variant, model), data, 32)
        plain: dict[tuple, list[float]] = {}
        ours: dict[tuple, list[dict]] = {}
        for rep in range(repeats):
            for threads in thread_counts:
                set_threads(threads)
                for model in models:
                    for b in BATCH_SIZES:
                        runs = ["plain", *variants]
                        for who in runs if rep % 2 == 0 else runs[::-1]:  # alternate who goes first
                            if who == "plain":
                                seconds = plain_trial(data, specs[model], steps, b, configs[model].seed)
                                plain.setdefault((model, threads, b), []).append(seconds)
                            else:
                                timed = trials.run(f"{who}/{model}", variant_cfg(who, model), data, b)
                                ours.setdefault((who, model, threads, b), []).append(timed)
        ours = {key: [timing_split(trials.tracker, t) for t in timed] for key, timed in ours.items()}
        print(f"\n(load average {os.getloadavg()[0]:.1f} at the end)")
        print_table(plain, ours, variants)
        model = "mlp" if "mlp" in models else models[0]
        print_calls(
            ours[("ours", model, thread_counts[0], 32)], f"{model}, batch 32, {thread_counts[0]} thread(s)"
        )

        # The gradient norms before and after: old per-iterate vmap(grad) vs closed form, same input.
        cfg = configs[model]
        outcome = evaluate(cfg, data, {"learning_rate": LEARNING_RATE, "batch_size": 32})
        traj, net = outcome.run.trajectories, outcome.run.model
        args_ = (data, cfg.bound.loss_clip, cfg.bound.lipschitz_subsample, cfg.seed)
        new_t, old_t = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            new = clipped_gradient_norms(net, traj, *args_)
            new_t.append(time.perf_counter() - started)
            started = time.perf_counter()
            old = _vmap_gradient_norms(net, traj, *args_)
            old_t.append(time.perf_counter() - started)
        print(
            f"\ngradient norms of {traj.shape[0] * traj.shape[1]} iterates x {cfg.bound.lipschitz_subsample} "
            f"examples ({model}): vmap(grad) per iterate {statistics.median(old_t):.3f} s, ours "
            f"{statistics.median(new_t):.3f} s, max |difference| {np.abs(new - old).max():.1e}"
        )
        os.chdir("/")


if __name__ == "__main__":
    main()
