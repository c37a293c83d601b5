"""Does the PAC-Bayes certificate hold? Certified bound vs the perturbed model's measured test error.

On the synthetic teacher task (unlimited rows, so a large test split T), run ``--trials`` trials of the
real pipeline (:func:`hsgd_tune.objective.evaluate`) over random learning rates and batch sizes. Each
trial's certificate bounds ``e_Q``, the expected error of the stochastic predictor Q; we estimate e_Q on T
with one fresh weight draw per test example (``n_test`` independent terms) and count the trials where the
certificate is below it. The statement holds jointly for all trials with probability ``>= 1 - δ``, so
more than a δ fraction of violations would refute it (and the estimate's own error, about
``sqrt(e(1-e)/n_test)``, is reported).

    python benchmarks/certificate_validity.py                       # 50 trials, ~ a few minutes
    python benchmarks/certificate_validity.py --quickstart-dir DIR  # also: non-vacuous share of a
                                                                    # quick-start study run in DIR

The certificate is an objective here, so every trial computes it (whatever ``[diagnostics] trials``
says). A quick-start study certifies only its Pareto front by default; ``--quickstart-dir`` says how
many of its trials carry a certificate (``hsgd-tune certify quickstart --all`` certifies the rest).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from hsgd_tune.config import parse_study
from hsgd_tune.data import load_dataset
from hsgd_tune.diagnostics import FlatModel, pointwise_draw_errors
from hsgd_tune.objective import evaluate


def study(trials: int, n_test: int) -> dict:
    return {
        "name": "certificate-validity",
        "seed": 0,
        "data": {
            "source": "synthetic",
            "n_train": 500,
            "n_val": 200,
            "n_test": n_test,
            "synthetic": {"kind": "teacher", "n_features": 20, "n_classes": 3, "noise": 0.1},
        },
        "model": {"kind": "mlp", "widths": [32]},
        "search": {
            "learning_rate": {"low": 0.01, "high": 0.5},
            "batch_size": {"choices": [8, 16, 32, 64, 128]},
        },
        "training": {"steps": 500, "record_every": 25},
        "bound": {"delta": 0.05, "max_trials": trials},
        "objectives": {"minimize": ["val_loss", "certificate"]},
        "diagnostics": {"tail_index": False, "analytic": False},
        "run": {"n_trials": trials},
    }


def run_validity(trials: int, n_test: int, seed: int) -> list[dict]:
    cfg = parse_study(study(trials, n_test), Path.cwd())
    data = load_dataset(cfg.data, cfg.seed)
    x_test = torch.as_tensor(data.test.x)
    y_test = torch.as_tensor(data.test.y).long()
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(trials):
        params = {
            "learning_rate": float(math.exp(rng.uniform(math.log(0.01), math.log(0.5)))),
            "batch_size": int(rng.choice([8, 16, 32, 64, 128])),
        }
        started = time.perf_counter()
        outcome = evaluate(cfg, data, params, cfg.max_trials)
        q = outcome.measured.posterior
        fm = FlatModel(outcome.run.model, data.task)
        test_q = float(
            pointwise_draw_errors(fm, q.mean, q.std, x_test, y_test, draws=1, seed=10_000 + i).mean()
        )
        metrics = outcome.metrics()
        rows.append(
            {
                **params,
                "certificate": metrics["certificate/bound"],
                "test_error_Q": test_q,
                "train_error_Q": metrics["certificate/mc_error"],
                "test_error_deterministic": _deterministic_test_error(fm, outcome.run.model, x_test, y_test),
                "kl": metrics["certificate/kl"],
                "seconds": time.perf_counter() - started,
            }
        )
        r = rows[-1]
        print(
            f"trial {i:3d} lr={r['learning_rate']:.4f} b={r['batch_size']:3d} "
            f"certificate={r['certificate']:.3f} "
            f"test_error_Q={r['test_error_Q']:.3f} (deterministic {r['test_error_deterministic']:.3f}) "
            f"KL={r['kl']:.1f} {r['seconds']:.1f}s",
            flush=True,
        )
    return rows


def _deterministic_test_error(fm: FlatModel, model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) != y).float().mean())


def summarize(rows: list[dict], delta: float, n_test: int) -> None:
    cert = np.array([r["certificate"] for r in rows])
    test = np.array([r["test_error_Q"] for r in rows])
    violations = int(np.sum(cert < test))
    print(
        f"\n{len(rows)} trials, δ = {delta}: "
        f"certificate below the measured test error of Q in {violations} trials"
    )
    print(
        f"  allowed by δ: at most {delta * len(rows):.1f} expected violations "
        "(jointly: none with prob. >= 1-δ)"
    )
    print(
        f"  certificate - test error of Q: min {np.min(cert - test):.3f}, median {np.median(cert - test):.3f}"
    )
    print(f"  certificate: median {np.median(cert):.3f}, range {cert.min():.3f}-{cert.max():.3f}")
    print(
        f"  test error of Q: median {np.median(test):.3f}; its estimation sd <= {0.5 / math.sqrt(n_test):.4f}"
    )


def quickstart_share(folder: Path) -> None:
    """Non-vacuous share of a finished quick-start study whose ``mlruns/`` is in ``folder``.

    By default a study certifies only its Pareto front (``[diagnostics] trials = "front"``), so only
    some trial runs carry a certificate; ``hsgd-tune certify quickstart --all`` certifies the rest.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hsgd-quickstart")
    if experiment is None:
        print(f"\nquick-start: no experiment hsgd-quickstart in {folder / 'mlruns' / 'mlflow.db'}")
        return
    runs = client.search_runs(
        [experiment.experiment_id],
        "attributes.status = 'FINISHED' and tags.`hsgd.role` = 'trial'",
        max_results=10_000,
    )
    values = [
        (
            r.data.metrics["certificate/bound"],
            r.data.metrics["certificate/trivial"],
            r.data.metrics.get("val/error"),
        )
        for r in runs
        if "certificate/bound" in r.data.metrics
    ]
    print(f"\nquick-start: {len(values)} of {len(runs)} finished trials carry a certificate")
    if not values:
        print("  none to summarise: certify them with `hsgd-tune certify quickstart --all`")
        return
    cert = np.array([v[0] for v in values])
    trivial = values[0][1]
    print(
        f"  below 0.5: {np.sum(cert < 0.5)}/{len(cert)}; "
        f"below the trivial bound {trivial:.2f}: {np.sum(cert < trivial)}/{len(cert)}"
    )
    print(f"  certificate: median {np.median(cert):.3f}, range {cert.min():.3f}-{cert.max():.3f}")
    val = np.array([v[2] for v in values if v[2] is not None])
    print(f"  validation error of the deterministic model: median {np.median(val):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--n-test", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quickstart-dir", type=Path, help="folder where the quick-start study was run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.trials:
        rows = run_validity(args.trials, args.n_test, args.seed)
        summarize(rows, delta=0.05, n_test=args.n_test)
    if args.quickstart_dir:
        quickstart_share(args.quickstart_dir)


if __name__ == "__main__":
    main()
