"""Recompute a finished study's certificates with this code: the same numbers, and what they cost?

For every trial of the study whose MLflow run holds a certificate, the certificate, tail-index and
analytic metrics are computed again from the trial's artifacts with the code of this checkout (nothing
is logged), compared bit for bit with what the run logged, and timed part by part (1 torch thread, one
trial at a time). Run it in the study's folder (its ``mlruns/``), e.g. after a change to the
certificates, on a study certified by the code before it:

    cd /tmp/cnn && hsgd-tune run /path/to/studies/cnn_digits.toml    # with the old code
    python /path/to/benchmarks/recertify.py /path/to/studies/cnn_digits.toml   # with the new code
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.overhead import set_threads  # noqa: E402
from hsgd_tune.search import certification  # noqa: E402
from hsgd_tune.search.prepare import prepare  # noqa: E402
from hsgd_tune.search.storage import open_storage  # noqa: E402
from hsgd_tune.studyfile.config import load_study  # noqa: E402
from hsgd_tune.track.tracker import Tracker  # noqa: E402

COMPARED = ("certificate/", "tail/", "analytic/")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="the study file (run from the study's folder)")
    args = ap.parse_args()
    set_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_study(args.study)
    data, tracker = prepare(cfg), Tracker()
    study = optuna.load_study(study_name=cfg.name, storage=open_storage(cfg.run.storage))
    print("| trial | metrics compared | different | seconds | split (s) |\n|---|---|---|---|---|")
    for trial in study.trials:
        logged = tracker.client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics
        if "certificate/bound" not in logged:
            continue
        started = time.perf_counter()
        _, _, metrics, _, _ = certification._compute(cfg, data, tracker, trial, logged)
        seconds = time.perf_counter() - started
        keys = [k for k in metrics if k.startswith(COMPARED)]
        different = [f"{k}: {logged.get(k)!r} → {metrics[k]!r}" for k in keys if logged.get(k) != metrics[k]]
        split = ", ".join(f"{k[5:-2]} {v:.2f}" for k, v in metrics.items() if k.startswith("time/"))
        print(
            f"| {trial.number} | {len(keys)} | {'; '.join(different) or 'none'} | {seconds:.2f} | {split} |"
        )


if __name__ == "__main__":
    main()
