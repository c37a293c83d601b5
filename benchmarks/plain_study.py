"""The plain peer of the quick-start: what a user would write without the advisor.

Optuna's TPE sampler (seeded as the study seed) searches the quick-start's learning rate (log scale,
0.005–0.5) and batch size (8, 16, 32, 64, 128) for the same trials; each trial trains the quick-start's
MLP (64, 64) on digits (the same 500 training and 500 validation rows as the quick-start, from
``hsgd_tune.data.datasets``) with ``torch.optim.SGD`` for the same steps at the same minibatch positions, and
logs its params, the final validation loss and the minibatch-loss curve (every ``record_every``
steps) to its own MLflow run under a parent run, in a SQLite store under ``mlruns/``, with Optuna's
journal file there too: one run per trial, as the quick-start has. No twin, no bound, no certificate.

    python benchmarks/plain_study.py [--trials 20] [--steps 1000] [--threads 1]   # in an empty folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
import optuna
import torch
from torch import nn

from hsgd_tune.data.datasets import load_dataset
from hsgd_tune.studyfile.config import load_study
from hsgd_tune.train.twin import minibatch_positions

QUICKSTART = Path(__file__).resolve().parent.parent / "studies" / "quickstart.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = load_study(QUICKSTART)
    data = load_dataset(cfg.data, cfg.seed)
    x, y = torch.as_tensor(data.train.x), torch.as_tensor(data.train.y)
    xv, yv = torch.as_tensor(data.val.x), torch.as_tensor(data.val.y)
    every = cfg.training.record_every

    Path("mlruns").mkdir(exist_ok=True)
    mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
    mlflow.set_experiment("plain-quickstart")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend("mlruns/journal.log"))
    sampler = optuna.samplers.TPESampler(seed=cfg.seed)
    study = optuna.create_study(study_name="plain", storage=storage, sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("learning_rate", 0.005, 0.5, log=True)
        batch_size = trial.suggest_categorical("batch_size", [8, 16, 32, 64, 128])
        with mlflow.start_run(run_name=f"trial-{trial.number:04d}", nested=True):
            mlflow.log_params({"learning_rate": lr, "batch_size": batch_size, "steps": args.steps})
            torch.manual_seed(cfg.seed)
            model = nn.Sequential(
                nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
            )
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            loss_fn = nn.CrossEntropyLoss()
            curve = []
            for step, pos in enumerate(
                minibatch_positions(len(y), batch_size, args.steps, cfg.seed), start=1
            ):
                idx = torch.as_tensor(pos)
                opt.zero_grad()
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                if step % every == 0 or step == args.steps:
                    curve.append((step, float(loss)))
            with torch.no_grad():
                val_loss = float(loss_fn(model(xv), yv))
            for step, value in curve:
                mlflow.log_metric("train/minibatch_loss", value, step=step)
            mlflow.log_metric("val/loss", val_loss, step=args.steps)
        return val_loss

    with mlflow.start_run(run_name="plain-quickstart"):
        study.optimize(objective, n_trials=args.trials)
    print(f"best val loss {study.best_value:.4f} with {study.best_params}")


if __name__ == "__main__":
    main()
