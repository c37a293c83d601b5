"""What does a cheaper posterior fit cost in certificate quality? Side by side on a finished study.

For every trial of a finished study (run from the study's folder), the learned-posterior certificate
(``certificate/bound``) is computed from the trial's artifacts with each of several settings of the
fit — optimisation steps, minibatch size, Adam's step sizes for Q's mean and log standard deviations,
snapshot interval — and timed; nothing is logged. Prints a row per trial, then the mean certificate
and mean seconds per setting. The default compares the fit before issue #17's last change (300 steps on
all 500 rows of the quick-start's S, step sizes 1e-3 and 0.05, a snapshot every 50 steps) with today's
defaults (150 steps on minibatches of 128, 7.5e-3 and 0.05, every 25):

    cd /tmp/qs && hsgd-tune run /path/to/studies/quickstart.toml
    python /path/to/benchmarks/posterior_settings.py /path/to/studies/quickstart.toml \
        --settings 300:512:0.001:0.05:50,150:128,200:128:0.005
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.overhead import set_threads  # noqa: E402
from hsgd_tune.certify import diagnostics  # noqa: E402
from hsgd_tune.search import certification  # noqa: E402
from hsgd_tune.search.objective import train_settings  # noqa: E402
from hsgd_tune.search.prepare import prepare  # noqa: E402
from hsgd_tune.search.storage import open_storage  # noqa: E402
from hsgd_tune.studyfile import grid  # noqa: E402
from hsgd_tune.studyfile.config import load_study  # noqa: E402
from hsgd_tune.track.tracker import Tracker  # noqa: E402


@dataclasses.dataclass(frozen=True)
class FitSetting:
    """One way to fit Q: ``steps:batch[:mean_lr:std_lr[:check_every]]`` on the command line."""

    steps: int
    batch: int
    mean_lr: float = diagnostics.MEAN_LR
    std_lr: float = diagnostics.STD_LR
    check_every: int = 25

    @classmethod
    def parse(cls, text: str) -> FitSetting:
        fields = text.split(":")
        kinds = (int, int, float, float, int)
        return cls(*(kind(value) for kind, value in zip(kinds, fields, strict=False)))

    def __str__(self) -> str:
        return f"{self.steps}:{self.batch}:{self.mean_lr:g}:{self.std_lr:g}:{self.check_every}"


def certificate(cfg, data, trial, twin, setting: FitSetting) -> tuple[float, float]:
    """(certificate/bound, seconds) of one trial with the fit set as ``setting`` says."""
    cfg = dataclasses.replace(cfg, certificate=dataclasses.replace(cfg.certificate, steps=setting.steps))
    fm = diagnostics.FlatModel(twin.model, data.task)
    out = diagnostics.Measurements()
    fit, step_sizes = diagnostics.fit_posterior, (diagnostics.MEAN_LR, diagnostics.STD_LR)
    diagnostics.fit_posterior = functools.partial(fit, batch=setting.batch, check_every=setting.check_every)
    diagnostics.MEAN_LR, diagnostics.STD_LR = setting.mean_lr, setting.std_lr
    try:
        started = time.perf_counter()
        diagnostics._certificate(
            out,
            cfg,
            data,
            train_settings(cfg, trial.params),
            twin,
            fm,
            diagnostics._tensors(data.train, data.task),
            None,
            grid.statement_deltas(cfg),
        )
        return out.metrics["certificate/bound"], time.perf_counter() - started
    finally:
        diagnostics.fit_posterior = fit
        diagnostics.MEAN_LR, diagnostics.STD_LR = step_sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="the study file (run from the study's folder)")
    ap.add_argument(
        "--settings",
        default="300:512:0.001:0.05:50,150:128",
        help="steps:batch[:mean_lr:std_lr[:check_every]], comma-separated; omitted parts: the defaults",
    )
    args = ap.parse_args()
    settings = [FitSetting.parse(item) for item in args.settings.split(",")]
    set_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_study(args.study)
    data, tracker = prepare(cfg), Tracker()
    study = optuna.load_study(study_name=cfg.name, storage=open_storage(cfg.run.storage))
    header = " | ".join(f"{setting} bound | s" for setting in settings)
    print(f"| trial | {header} |\n|---|{'---|---|' * len(settings)}")
    results: dict[FitSetting, list[tuple[float, float]]] = {setting: [] for setting in settings}
    for trial in study.trials:
        if trial.state != optuna.trial.TrialState.COMPLETE:
            continue
        run = tracker.client.get_run(trial.user_attrs["mlflow_run_id"])
        with tempfile.TemporaryDirectory() as tmp:
            twin = certification.load_twin(
                tracker, trial.number, run.info.run_id, Path(tmp), run.data.metrics
            )
        cells = []
        for setting in settings:
            bound, seconds = certificate(cfg, data, trial, twin, setting)
            results[setting].append((bound, seconds))
            cells.append(f"{bound:.4f} | {seconds:.2f}")
        print(f"| {trial.number} | {' | '.join(cells)} |", flush=True)
    means = " | ".join(
        f"{statistics.mean(b for b, _ in rows):.4f} | {statistics.mean(s for _, s in rows):.2f}"
        for rows in results.values()
    )
    print(f"| mean | {means} |")


if __name__ == "__main__":
    main()
