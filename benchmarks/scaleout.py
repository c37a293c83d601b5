"""Scaling out: throughput of 1 vs 2 local workers on the same study, measured side by side.

Each configuration runs the same fresh study (journal store, local MLflow, in its own temporary
folder) through the real command line: ``hsgd-tune run STUDY --workers K``. Reported: wall time
and finished trials per minute. Run from the repository root:

    python -m benchmarks.scaleout [--trials 16] [--steps 300] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = """\
name = "bench"
seed = 0
[data]
source = "digits"
n_train = 300
n_val = 300
[model]
kind = "mlp"
widths = [64, 64]
[search.learning_rate]
low = 0.005
high = 0.5
[search.batch_size]
choices = [8, 16, 32, 64]
[training]
steps = {steps}
record_every = 25
[certificate]
enabled = false  # measure the scaling of trials, not the certificate's cost
[diagnostics]
tail_index = false
analytic = false
[run]
n_trials = {trials}
"""


def measure(workers: int, trials: int, steps: int) -> float:
    """Seconds for a fresh study of ``trials`` trials with ``workers`` local processes."""
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "bench.toml"
        study.write_text(STUDY.format(trials=trials, steps=steps))
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        command = [
            sys.executable,
            "-m",
            "hsgd_tune.cli.main",
            "run",
            str(study),
            "--quiet",
            "--workers",
            str(workers),
        ]
        started = time.perf_counter()
        subprocess.run(command, cwd=tmp, env=env, check=True, capture_output=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.1f}")
    print("workers  seconds  trials/min")
    for _ in range(args.repeats):
        for workers in (1, 2):  # side by side, alternating, so drifting machine load hits both
            seconds = measure(workers, args.trials, args.steps)
            print(f"{workers:7d}  {seconds:7.1f}  {60 * args.trials / seconds:10.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
