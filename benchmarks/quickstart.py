"""Is the quick-start faster than before? Two versions of the package, run side by side.

Each version (the working tree and ``--before``, a git revision) runs its own
``studies/quickstart.toml`` with ``python -m hsgd_tune.cli run`` in a fresh empty folder (so each
run creates its MLflow database and Optuna journal, as a new user's first run does), alternating
which goes first. Reported per version: the median wall time of the whole command and of the trials
alone (first trial start to last trial end, from the Optuna journal), and the ratio after / before.

    python benchmarks/quickstart.py --before 7db98e2            # 3 runs of each version
    python benchmarks/quickstart.py --before 7db98e2 --runs 1
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parent.parent


def export_revision(revision: str, into: Path) -> Path:
    """The package and study files of ``revision``, unpacked into ``into``."""
    blob = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "hsgd_tune", "studies"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_quickstart(source: Path) -> dict[str, float]:
    """Run ``source``'s quick-start in an empty folder with ``source`` first on the path."""
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "PYTHONPATH": str(source), "MLFLOW_TRACKING_URI": ""}
        command = [sys.executable, "-m", "hsgd_tune.cli", "run", str(source / "studies" / "quickstart.toml")]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        total = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"quick-start of {source} failed:\n{done.stderr[-2000:]}")
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(Path(work) / "mlruns" / "optuna-journal.log"))
        )
        trials = optuna.load_study(study_name="quickstart", storage=storage).trials
        first = min(t.datetime_start for t in trials)
        last = max(t.datetime_complete for t in trials)
        return {"command": total, "trials": (last - first).total_seconds(), "n": len(trials)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--runs", type=int, default=3, help="runs of each version (alternating)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"before": export_revision(args.before, Path(tmp)), "after": REPO}
        times: dict[str, list[dict]] = {name: [] for name in versions}
        for run in range(args.runs):
            order = list(versions) if run % 2 == 0 else list(versions)[::-1]
            for name in order:
                times[name].append(run_quickstart(versions[name]))
                print(f"run {run + 1} {name}: {times[name][-1]}", flush=True)
    print("\n| version | runs | trials | whole command (s) | trials alone (s) |\n|---|---|---|---|---|")
    med = {}
    for name, rows in times.items():
        med[name] = {k: statistics.median(r[k] for r in rows) for k in ("command", "trials")}
        label = f"before ({args.before})" if name == "before" else "after (working tree)"
        command, trials = med[name]["command"], med[name]["trials"]
        print(f"| {label} | {len(rows)} | {rows[0]['n']} | {command:.1f} | {trials:.1f} |")
    ratio = {k: med["after"][k] / med["before"][k] for k in ("command", "trials")}
    print(f"\nafter / before: whole command {ratio['command']:.2f}, trials alone {ratio['trials']:.2f}")


if __name__ == "__main__":
    main()
