"""What do cheaper certificates cost in quality? Side by side on a finished study.

For every trial of a finished study (run from the study's folder), the learned-posterior certificate
(``certificate/bound``) is computed from the trial's artifacts with each of several settings of the
fit — optimisation steps, minibatch size, Adam's step sizes for Q's mean and log standard deviations,
snapshot interval — and the perturbed certificate (``certificate/perturbed_bound``) with each size of
its σ pilot, and timed; nothing is logged. Prints a row per trial, then the mean certificate and mean
seconds per setting. The default compares the fit before issue #17's last change (300 steps on all 500
rows of the quick-start's S, step sizes 1e-3 and 0.05, a snapshot every 50 steps) with today's
defaults (150 steps on minibatches of 128, 7.5e-3 and 0.05, every 25), and the pilot on 256 examples
with today's 128:

    cd /tmp/qs && hsgd-tune run /path/to/studies/quickstart.toml
    python /path/to/benchmarks/posterior_settings.py /path/to/studies/quickstart.toml \\
        --settings 300:512:0.001:0.05:50,150:128,200:128:0.005,pilot:256,pilot:128
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


def _timed(step, cfg, data, trial, twin) -> tuple[dict, float]:
    """(metrics, seconds) of one certificate step of :mod:`diagnostics` on ``twin``."""
    out = diagnostics.Measurements()
    started = time.perf_counter()
    step(
        out,
        cfg,
        data,
        train_settings(cfg, trial.params),
        twin,
        diagnostics.FlatModel(twin.model, data.task),
        diagnostics._tensors(data.train, data.task),
        None,
        grid.statement_deltas(cfg),
    )
    return out.metrics, time.perf_counter() - started


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
        return f"{self.steps}:{self.batch}:{self.mean_lr:g}:{self.std_lr:g}:{self.check_every} bound"

    def measure(self, cfg, data, trial, twin) -> tuple[float, float]:
        """(certificate/bound, seconds) of one trial with the fit set as this says."""
        cfg = dataclasses.replace(cfg, certificate=dataclasses.replace(cfg.certificate, steps=self.steps))
        fit, step_sizes = diagnostics.fit_posterior, (diagnostics.MEAN_LR, diagnostics.STD_LR)
        diagnostics.fit_posterior = functools.partial(fit, batch=self.batch, check_every=self.check_every)
        diagnostics.MEAN_LR, diagnostics.STD_LR = self.mean_lr, self.std_lr
        try:
            metrics, seconds = _timed(diagnostics._certificate, cfg, data, trial, twin)
            return metrics["certificate/bound"], seconds
        finally:
            diagnostics.fit_posterior = fit
            diagnostics.MEAN_LR, diagnostics.STD_LR = step_sizes


@dataclasses.dataclass(frozen=True)
class PilotSetting:
    """The perturbed certificate with its σ pilot on ``examples`` rows of S: ``pilot:EXAMPLES``."""

    examples: int

    def __str__(self) -> str:
        return f"pilot:{self.examples} perturbed_bound"

    def measure(self, cfg, data, trial, twin) -> tuple[float, float]:
        """(certificate/perturbed_bound, seconds) of one trial with this pilot."""
        examples = diagnostics._PILOT_EXAMPLES
        diagnostics._PILOT_EXAMPLES = self.examples
        try:
            metrics, seconds = _timed(diagnostics._perturbed, cfg, data, trial, twin)
            return metrics["certificate/perturbed_bound"], seconds
        finally:
            diagnostics._PILOT_EXAMPLES = examples


def parse_setting(text: str) -> FitSetting | PilotSetting:
    if text.startswith("pilot:"):
        return PilotSetting(int(text.removeprefix("pilot:")))
    return FitSetting.parse(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="the study file (run from the study's folder)")
    ap.add_argument(
        "--settings",
        default="300:512:0.001:0.05:50,150:128,pilot:256,pilot:128",
        help="steps:batch[:mean_lr:std_lr[:check_every]] (the posterior fit; omitted parts: the defaults) "
        "or pilot:EXAMPLES (the perturbed certificate's σ pilot), comma-separated",
    )
    args = ap.parse_args()
    settings = [parse_setting(item) for item in args.settings.split(",")]
    set_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = load_study(args.study)
    data, tracker = prepare(cfg), Tracker()
    study = optuna.load_study(study_name=cfg.name, storage=open_storage(cfg.run.storage))
    header = " | ".join(f"{setting} | s" for setting in settings)
    print(f"| trial | {header} |\n|---|{'---|---|' * len(settings)}")
    results: dict[FitSetting | PilotSetting, list[tuple[float, float]]] = {s: [] for s in settings}
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
            bound, seconds = setting.measure(cfg, data, trial, twin)
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
