"""The quick-start end to end against a plain Optuna + MLflow script, side by side.

Three commands, each in a fresh empty folder (so each creates its MLflow database and Optuna journal,
as a new user's first run does), in turn, the order rotating from run to run:

- *ours*: ``hsgd-tune run studies/quickstart.toml --quiet``: twin runs, bound, logging, and after the
  trials the certificates of the recommended trial and the runner-up (``[diagnostics] trials =
  "recommended"``, the default);
- *ours, whole front certified*: the same with ``[diagnostics] trials = "front"`` (every Pareto-front
  trial certified after the study, as ``hsgd-tune certify STUDY`` does on request);
- *ours, no certificates*: the same study with ``[diagnostics] trials = "none"``;
- *plain*: ``benchmarks/plain_study.py``: Optuna TPE + ``nn.Module`` + ``torch.optim.SGD`` + MLflow,
  same model, steps, search space, sampler and number of trials.

Both sides run with the same torch threads (``--threads``, default 1: on a shared machine torch's
default of one thread per core makes a run many times slower, which would measure that, not us).

Reported: median wall time of each whole command (interpreter start-up included), ours / plain, and
for ours the certificates' share (the time from the last trial's end to the command's end, read from
the Optuna journal, includes printing the ranking).

    python benchmarks/study.py            # 20 trials of 1000 steps (the quick-start), 3 runs
    python benchmarks/study.py --quick    # 10 trials of 300 steps, 1 run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import optuna

from hsgd_tune.studyfile.export import dumps_toml

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "studies" / "quickstart.toml"


def study_file(folder: Path, trials: int, steps: int, certificates: bool | str) -> Path:
    """The quick-start's study file with ``trials`` and ``steps``; ``certificates``: False for
    none, True for the default, or a ``[diagnostics] trials`` value."""
    doc = tomllib.loads(QUICKSTART.read_text())
    doc["run"]["n_trials"] = trials
    doc["training"]["steps"] = steps
    if certificates is not True:
        doc["diagnostics"] = {"trials": certificates or "none"}
    path = folder / "quickstart.toml"
    path.write_text(dumps_toml(doc))
    return path


def timed(command: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds of ``command`` in ``cwd``, and when it ended (UTC)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": ""}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds, time.time()


def run_ours(trials: int, steps: int, certificates: bool | str, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as work:
        study = study_file(Path(work), trials, steps, certificates)
        command = [
            sys.executable,
            "-m",
            "hsgd_tune.cli.main",
            "run",
            str(study),
            "--quiet",
            "--threads",
            str(threads),
        ]
        seconds, ended = timed(command, Path(work))
        journal = optuna.storages.journal.JournalFileBackend(
            str(Path(work) / "mlruns" / "optuna-journal.log")
        )
        done = optuna.load_study(
            study_name="quickstart", storage=optuna.storages.JournalStorage(journal)
        ).trials
        last_trial = max(t.datetime_complete for t in done).timestamp()  # naive local time, as time.time()
        return {"total": seconds, "after trials": ended - last_trial, **certified(Path(work), done)}


def certified(work: Path, trials: list) -> dict[str, float]:
    """How many trials hold a certificate, their trials' wall seconds (start to end, from the
    journal), and the seconds their certificates took (``time/diagnostics_s``, each in its thread)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
    rows = []
    for trial in trials:
        metrics = client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics
        if "certificate/bound" in metrics:
            rows.append(((trial.datetime_complete - trial.datetime_start).total_seconds(), metrics))
    return {
        "certified": len(rows),
        "their trials": sum(seconds for seconds, _ in rows),
        "certificates": sum(m["time/diagnostics_s"] for _, m in rows),
    }


def run_plain(trials: int, steps: int, threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as work:
        script = str(REPO / "benchmarks" / "plain_study.py")
        command = [
            sys.executable,
            script,
            "--trials",
            str(trials),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
        ]
        seconds, _ = timed(command, Path(work))
        return {"total": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 trials of 300 steps, 1 run")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every command")
    args = ap.parse_args()
    trials = args.trials or (10 if args.quick else 20)
    steps = args.steps or (300 if args.quick else 1000)
    runs = args.runs or (1 if args.quick else 3)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    commands = {
        "ours": lambda: run_ours(trials, steps, True, args.threads),
        "ours, whole front certified": lambda: run_ours(trials, steps, "front", args.threads),
        "ours, no certificates": lambda: run_ours(trials, steps, False, args.threads),
        "plain Optuna + MLflow": lambda: run_plain(trials, steps, args.threads),
    }
    print(
        f"# study: {trials} trials of {steps} steps, {runs} run(s) of each command, order rotating, "
        f"{args.threads} torch thread(s); "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    )
    times: dict[str, list[dict]] = {name: [] for name in commands}
    names = list(commands)
    for run in range(runs):
        order = names[run % len(names) :] + names[: run % len(names)]
        for name in order:
            times[name].append(commands[name]())
            print(f"run {run + 1} {name}: {times[name][-1]}", flush=True)
    plain = statistics.median(r["total"] for r in times["plain Optuna + MLflow"])
    print(f"\n(load average {os.getloadavg()[0]:.1f} at the end)\n")
    print(
        "| command | runs | whole command (s) | / plain | after the last trial (s) | certified trials "
        "| their trials (s) | their certificates (s) | certificates / their trials |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for name, rows in times.items():
        total = statistics.median(r["total"] for r in rows)
        cells = ["-"] * 5
        if "after trials" in rows[0]:
            median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            ratio = f"{median['certificates'] / median['their trials']:.2f}" if median["certified"] else "-"
            cells = [
                f"{median['after trials']:.1f}",
                f"{median['certified']:g}",
                f"{median['their trials']:.1f}",
                f"{median['certificates']:.1f}",
                ratio,
            ]
        print(f"| {name} | {len(rows)} | {total:.1f} | {total / plain:.2f} | {' | '.join(cells)} |")
    print(
        "\n(their trials: wall seconds of the certified trials, start to end, from the journal; their "
        "certificates: each certificate's time/diagnostics_s, computed after the study, one after the "
        "other for the quick-start's MLP, side by side in threads for other models)"
    )


if __name__ == "__main__":
    main()
