"""Do the certified statements hold under an adaptive sampler? Each certificate vs what it bounds,
measured on a large test split.

On the synthetic teacher task (unlimited rows, so a large test split T), run ``--studies`` studies of
``--trials`` trials each with the study's own sampler (TPE by default: each configuration is chosen
from earlier results on S, the case a union over trial numbers does not cover) and the real trial
(:func:`hsgd_tune.search.objective.evaluate`, every certificate computed in every trial). For every certified
statement, count the trials where it is false on T:

* ``C`` (complexity): ``R_B(w^H_j) − R̂_{S,B}(w^H_j) ≤ C`` for every recorded reference iterate j;
* held-out: the final S-model's 0-1 error ≤ ``certificate/heldout_error``, and every recorded
  S-iterate's error ≤ its bound (``certificate/heldout_error_max`` statement);
* perturbed: the error of ``Q = N(w^S_last, σ²I)`` ≤ ``certificate/perturbed_bound``;
* PAC-Bayes: the error of the learned posterior Q ≤ ``certificate/bound``;
* and, for comparison, the *estimated* risk bound: ``R_B(w^S_last) ≤ bound/risk_bound``.

All certified statements of a study hold jointly with probability ≥ 1 − δ, so more than δ·(trials)
violations in expectation would refute them. T's own estimation error is at most ``0.5/sqrt(n_test)``.

    python benchmarks/certificate_validity.py                 # 3 studies × 17 trials, TPE
    python benchmarks/certificate_validity.py --quickstart-dir DIR   # + certificates of a quick-start run
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from hsgd_tune import bound
from hsgd_tune.certify.diagnostics import FlatModel, iterate_errors, iterate_risks, pointwise_draw_errors
from hsgd_tune.data.datasets import load_dataset
from hsgd_tune.errors import DivergedError
from hsgd_tune.search.objective import evaluate
from hsgd_tune.search.study import make_sampler, sample_params
from hsgd_tune.studyfile import grid
from hsgd_tune.studyfile.config import parse_study
from hsgd_tune.train.twin import H_RUN, S_RUN

RESULTS = Path(__file__).resolve().parent / "results"
DELTA = 0.05


def study(seed: int, trials: int, n_test: int, sampler: str) -> dict:
    return {
        "name": f"certificate-validity-{seed}",
        "seed": seed,
        "data": {
            "source": "synthetic",
            "n_train": 500,
            "n_reference": 500,
            "n_val": 200,
            "n_test": n_test,
            "synthetic": {"kind": "teacher", "n_features": 20, "n_classes": 3, "noise": 0.1},
        },
        "model": {"kind": "mlp", "widths": [32]},
        "search": {
            "learning_rate": {"low": 0.01, "high": 0.5},
            "batch_size": {"choices": [8, 16, 32, 64, 128]},
        },
        "training": {"steps": 300, "record_every": 25},
        "bound": {"delta": DELTA},
        "certificate": {"steps": 150},
        "objectives": {"minimize": ["val_loss", "risk_bound"]},
        "diagnostics": {"trials": "all", "tail_index": False, "analytic": False},
        "sampler": {"kind": sampler},
        "run": {"n_trials": trials},
    }


def run_study(seed: int, trials: int, n_test: int, sampler: str) -> list[dict]:
    """One study, asked and told like ``hsgd-tune run`` does, each trial checked against T."""
    cfg = parse_study(study(seed, trials, n_test, sampler), Path.cwd())
    data = load_dataset(cfg.data, cfg.seed)
    test = torch.as_tensor(data.test.x), torch.as_tensor(data.test.y).long()
    optuna_study = optuna.create_study(directions=["minimize"] * 2, sampler=make_sampler(cfg, 0))
    rows = []
    for i in range(trials):
        trial = optuna_study.ask()
        params = sample_params(trial, cfg)
        started = time.perf_counter()
        try:
            outcome = evaluate(cfg, data, params)
        except DivergedError:
            optuna_study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        optuna_study.tell(trial, [outcome.objective(name) for name in cfg.objectives])
        rows.append({"study": seed, "trial": i, **params, **check(cfg, data, outcome, test, seed, i)})
        rows[-1]["seconds"] = time.perf_counter() - started
        print(_line(rows[-1]), flush=True)
    return rows


def check(cfg, data, outcome, test, seed: int, i: int) -> dict:
    """Every statement of one trial next to what it bounds, measured on T."""
    x, y = test
    metrics, run, clip = outcome.metrics(), outcome.run, cfg.bound.loss_clip
    fm = FlatModel(run.model, data.task)
    traj_s, traj_h = run.trajectories[S_RUN], run.trajectories[H_RUN]
    train = torch.as_tensor(data.train.x), torch.as_tensor(data.train.y).long()
    gap_h = iterate_risks(fm, traj_h, x, y, clip) - iterate_risks(fm, traj_h, *train, clip)
    errors_s = iterate_errors(fm, traj_s, x, y, clip)  # (N,) test error of every S-iterate
    n_h, delta_h = len(data.reference.y), outcome.deltas["heldout"]
    reference = torch.as_tensor(data.reference.x), torch.as_tensor(data.reference.y).long()
    measured_h = iterate_errors(fm, traj_s, *reference, clip)  # as the trial measured them
    every = [bound.heldout_upper(float(e), n_h, delta_h / 2 / len(traj_s)) for e in measured_h]
    sigma = metrics["certificate/perturbed_sigma"]
    w_last = traj_s[-1].astype(np.float64)
    # The errors of Q on T with each row's weights drawn in full (local=False): measured independently
    # of the local reparameterisation the certificates' own Monte Carlo uses.
    std = np.full(len(w_last), sigma)
    perturbed = pointwise_draw_errors(fm, w_last, std, x, y, 1, clip, 50_000 + i, local=False)
    q = outcome.measured.posterior
    pacbayes = pointwise_draw_errors(fm, q.mean, q.std, x, y, 1, clip, 90_000 + i, local=False)
    risk_test = float(iterate_risks(fm, traj_s[-1:], x, y, clip)[0])
    return {
        "C": metrics["bound/complexity"],
        "C_needed": float(gap_h.max()),
        "heldout_error": metrics["certificate/heldout_error"],
        "test_error": float(errors_s[-1]),
        "heldout_every_violated": bool(np.any(np.array(every) < errors_s)),
        "heldout_error_max": metrics["certificate/heldout_error_max"],
        "perturbed_bound": metrics["certificate/perturbed_bound"],
        "test_error_perturbed": float(perturbed.mean()),
        "pacbayes_bound": metrics["certificate/bound"],
        "test_error_Q": float(pacbayes.mean()),
        "risk_bound": metrics["bound/risk_bound"],
        "risk_bound_uniform": metrics["bound/risk_bound_uniform"],
        "test_risk_clipped": risk_test,
    }


def _line(r: dict) -> str:
    return (
        f"study {r['study']} trial {r['trial']:2d} lr={r['learning_rate']:.4f} b={r['batch_size']:3d} "
        f"test error {r['test_error']:.3f}: held-out {r['heldout_error']:.3f}, perturbed "
        f"{r['perturbed_bound']:.3f} (Q_σ {r['test_error_perturbed']:.3f}), "
        f"PAC-Bayes {r['pacbayes_bound']:.3f} (Q {r['test_error_Q']:.3f}); "
        f"C {r['C']:.3f} needs {r['C_needed']:.3f}; risk bound "
        f"{r['risk_bound']:.2f} (test {r['test_risk_clipped']:.2f}) {r['seconds']:.0f}s"
    )


STATEMENTS = (
    # name, status, violated?, bound column, measured column
    ("C (complexity, all H-iterates)", "certified", lambda r: r["C"] < r["C_needed"], "C", "C_needed"),
    (
        "held-out, final S-model",
        "certified",
        lambda r: r["heldout_error"] < r["test_error"],
        "heldout_error",
        "test_error",
    ),
    (
        "held-out, every S-iterate",
        "certified",
        lambda r: r["heldout_every_violated"],
        "heldout_error_max",
        None,
    ),
    (
        "perturbed, last step",
        "certified",
        lambda r: r["perturbed_bound"] < r["test_error_perturbed"],
        "perturbed_bound",
        "test_error_perturbed",
    ),
    (
        "PAC-Bayes (learned Q)",
        "certified",
        lambda r: r["pacbayes_bound"] < r["test_error_Q"],
        "pacbayes_bound",
        "test_error_Q",
    ),
    (
        "risk bound (G, clipped loss)",
        "estimated",
        lambda r: r["risk_bound"] < r["test_risk_clipped"],
        "risk_bound",
        "test_risk_clipped",
    ),
)


def table(rows: list[dict], n_test: int) -> str:
    lines = [
        f"{len(rows)} finished trials in {len({r['study'] for r in rows})} studies; δ = {DELTA} per study "
        f"(allowed: {DELTA * len(rows):.2f} violations in expectation over these trials); test split "
        f"{n_test} rows (estimation sd ≤ {0.5 / math.sqrt(n_test):.4f})",
        "",
        "| statement | status | violations | median bound | median measured on T |",
        "|---|---|---|---|---|",
    ]
    for name, status, violated, bound_col, measured_col in STATEMENTS:
        count = sum(bool(violated(r)) for r in rows)
        bound_median = np.median([r[bound_col] for r in rows])
        measured = f"{np.median([r[measured_col] for r in rows]):.3f}" if measured_col else "(per iterate)"
        lines.append(f"| {name} | {status} | {count} / {len(rows)} | {bound_median:.3f} | {measured} |")
    uniform = np.median([r["risk_bound_uniform"] for r in rows])
    lines.append("")
    lines.append(
        f"Median test error of the final S-model {np.median([r['test_error'] for r in rows]):.3f}; "
        f"old uniform risk bound C + 2·L̂·D: median {uniform:.1f} (B = 5)."
    )
    return "\n".join(lines)


def quickstart_share(folder: Path) -> None:
    """Certificates of a finished quick-start study whose ``mlruns/`` is in ``folder``."""
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
    for key in (
        "certificate/heldout_error",
        "certificate/perturbed_bound",
        "certificate/bound",
        "bound/risk_bound",
    ):
        values = np.array([r.data.metrics[key] for r in runs if key in r.data.metrics])
        if values.size:
            print(
                f"quick-start {key}: {values.size} of {len(runs)} finished trials; "
                f"median {np.median(values):.3f}, range {values.min():.3f}-{values.max():.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=3)
    parser.add_argument("--trials", type=int, default=17, help="trials per study")
    parser.add_argument("--n-test", type=int, default=20_000)
    parser.add_argument("--sampler", default="tpe", choices=("tpe", "random", "nsga2"))
    parser.add_argument("--quickstart-dir", type=Path, help="folder where the quick-start study was run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.trials:
        started = time.perf_counter()
        rows = [r for s in range(args.studies) for r in run_study(s, args.trials, args.n_test, args.sampler)]
        text = table(rows, args.n_test)
        text += f"\n\nWall time {(time.perf_counter() - started) / 60:.1f} min; grid |Λ| = "
        cfg = parse_study(study(0, args.trials, args.n_test, args.sampler), Path.cwd())
        text += (
            f"{cfg.grid_size} configurations, δ_λ = δ/|Λ| split over {len(grid.statements(cfg))} statements."
        )
        print("\n" + text)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "certificate-validity.md").write_text(text + "\n")
    if args.quickstart_dir:
        quickstart_share(args.quickstart_dir)


if __name__ == "__main__":
    main()
