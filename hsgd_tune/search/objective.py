"""One trial: sample → twin training → bound → log → objectives.

:func:`evaluate` is the trial without Optuna or MLflow (sampled values in, scores out), so it can be
reused by ``train`` commands, benchmarks and tests; :class:`Objective` wraps it for a study.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from hsgd_tune.bound import TrajectoryBound, trajectory_bound
from hsgd_tune.certify.diagnostics import Measurements, heldout, measure, trajectory_measures
from hsgd_tune.certify.estimates import HeldOut, heldout_estimates
from hsgd_tune.data.datasets import Dataset
from hsgd_tune.errors import ConfigError, DivergedError
from hsgd_tune.search.study import FAIL_REASON, sample_params, set_user_attrs, worker_identity
from hsgd_tune.studyfile import grid
from hsgd_tune.studyfile.config import NOISE_KNOBS, TRAINING_KNOBS, StudyConfig
from hsgd_tune.track.tracker import Tracker, flatten
from hsgd_tune.train.models import ModelSpec, model_spec
from hsgd_tune.train.sketch import sketch_assumptions
from hsgd_tune.train.twin import H_RUN, S_RUN, TrainSettings, TwinRun, train_twin


@dataclass
class TrialOutcome:
    params: dict[str, Any]
    settings: TrainSettings
    spec: ModelSpec
    run: TwinRun
    bound: TrajectoryBound
    measured: Measurements | None = None  # certificate/…, tail/…, analytic/… (diagnostics.py)
    certified_heldout: Measurements | None = None  # certificate/heldout_… (every trial)
    deltas: dict[str, float] = field(default_factory=dict)  # each statement's share of δ_λ
    heldout: HeldOut | None = None  # val/…_se, heldout/…, crossfit/… estimates (certify/estimates.py)

    def metrics(self) -> dict[str, float]:
        """Final metrics, every bound term and timings, namespaced (``val/loss``, ``bound/…``)."""
        seconds = {f"time/{k}_s": v for k, v in self.run.seconds.items()}
        run = self.run
        sizes = {"train/n_parameters": run.n_parameters, "train/trajectory_bytes": run.trajectories.nbytes}
        if self.run.sketch_dim:
            epsilon, _ = sketch_assumptions(self.run.sketch_dim, self.bound.n_points)
            sizes |= {"bound/sketch_dim": self.run.sketch_dim, "bound/sketch_epsilon": epsilon}
        measured = {}
        if self.measured is not None:
            timings = {f"time/{k}_s": v for k, v in self.measured.seconds.items()}
            measured = {**self.measured.metrics, **timings}
        if self.certified_heldout is not None:
            measured |= self.certified_heldout.metrics
        measured |= {f"bound/delta_{k}": v for k, v in self.deltas.items()}
        estimates = self.heldout.metrics() if self.heldout is not None else {}
        return {
            **self.run.final,
            **estimates,
            **self.bound.metrics(),
            **seconds,
            **sizes,
            **measured,
        }

    def objective(self, name: str) -> float:
        return {
            "val_loss": self.run.final["val/loss"],
            "val_error": self.run.final["val/error"],
            "train_loss": self.run.final["train/loss"],
            "risk_bound": self.bound.risk_bound,
            "gap_bound": self.bound.gap_bound,
            "decoupling_distance": self.bound.decoupling_distance,
            "heldout_loss": self._estimate("heldout/loss"),
            "crossfit_loss": self._estimate("crossfit/loss"),
            "certificate": self.measured.metrics.get("certificate/bound", math.nan)
            if self.measured
            else math.nan,
        }[name]

    def _estimate(self, key: str) -> float:
        """A held-out estimate, NaN when it was not computed (a NaN objective fails the trial)."""
        return self.heldout.metrics().get(key, math.nan) if self.heldout is not None else math.nan

    def tags(self) -> dict[str, str]:
        """The assumption behind each bound term, and whether the trial is inside the theory."""
        assumptions = self.bound.assumptions()
        if self.run.sketch_dim:  # distances between JL sketches are estimates (sketch.py)
            assumptions |= sketch_assumptions(self.run.sketch_dim, self.bound.n_points)[1]
        tags = {f"hsgd.assumption.{term}": text for term, text in assumptions.items()}
        outside = self.settings.outside_theory
        tags["hsgd.theory"] = "outside: " + ", ".join(outside) if outside else "plain SGD (inside)"
        tags["hsgd.vacuous.risk_bound"] = str(self.bound.risk_bound_vacuous).lower()
        if self.certified_heldout is not None:
            tags |= self.certified_heldout.tags
        if self.heldout is not None:
            tags |= self.heldout.tags()
        if self.run.twin:  # how both runs were stepped (training.make_twin; measured for user models)
            tags["hsgd.twin_step"] = self.run.twin
        if self.measured is not None:
            tags |= self.measured.tags
        tags["hsgd.delta_split"] = DELTA_SPLIT
        return tags


#: How a configuration's δ_λ is spent (grid.py); logged with every trial.
DELTA_SPLIT = (
    "δ_λ = δ·π(λ), π uniform over the configuration grid Λ (a union over configurations, not trials); "
    "split equally among the configuration's statements: trajectory bound, held-out certificate, and "
    "with [certificate] enabled the perturbed and PAC-Bayes certificates (bound/delta_<statement>)"
)


def config_params(cfg: StudyConfig) -> dict[str, Any]:
    """The resolved config as flat MLflow params, without ``[run]`` (how a study runs, which may
    change between resumes; MLflow params cannot) and without what does not apply to this study
    (:func:`not_applicable`)."""
    flat = {k: v for k, v in flatten(cfg.to_dict()).items() if not k.startswith("run.")}
    skip = not_applicable(cfg)
    return {k: v for k, v in flat.items() if v not in (None, []) and not k.startswith(skip)}


def not_applicable(cfg: StudyConfig) -> tuple[str, ...]:
    """Prefixes of config keys that the study does not use: a digits study has no ``data.synthetic.*``,
    a study without the certificate no ``certificate.steps``, a categorical knob no ``low``/``high``."""
    skip = ["search.learning_rate.name", "search.batch_size.name"]  # the key already names it
    if cfg.data.source != "synthetic":
        skip.append("data.synthetic.")
    if cfg.model.kind != "mlp":
        skip.append("model.widths")
    for knob in (cfg.search.learning_rate, cfg.search.batch_size):
        if knob.kind == "categorical":
            skip += [f"search.{knob.name}.{k}" for k in ("low", "high", "log")]
    noise_knobs = {k.name for k in cfg.search.all_knobs()} & {"noise_alpha", "noise_sigma"}
    if cfg.training.noise.sigma == 0 and not noise_knobs:
        skip.append("training.noise.alpha")
    if not cfg.certificate.enabled:
        skip += [f"certificate.{k}" for k in ("posterior", "steps", "mc_draws")]
    if cfg.sampler.kind != "grid":
        skip.append("sampler.grid_points")
    return tuple(skip)


def train_settings(cfg: StudyConfig, params: dict[str, Any]) -> TrainSettings:
    return TrainSettings(
        learning_rate=float(params["learning_rate"]),
        batch_size=int(params["batch_size"]),
        steps=cfg.training.steps,
        record_every=cfg.training.record_every,
        # Common random numbers: every trial starts from the same weights and draws minibatches
        # from the same stream, so trials differ by their hyperparameters, not by luck.
        seed=cfg.seed,
        divergence_factor=cfg.training.divergence_factor,
        momentum=float(params.get("momentum", 0.0)),
        weight_decay=float(params.get("weight_decay", 0.0)),
        noise_alpha=float(params.get("noise_alpha", cfg.training.noise.alpha)),
        noise_sigma=float(params.get("noise_sigma", cfg.training.noise.sigma)),
        loss_clip=cfg.bound.loss_clip,
        lipschitz_subsample=cfg.bound.lipschitz_subsample,
        sketch_above=cfg.training.sketch_above,
        sketch_dim=cfg.training.sketch_dim,
        device=cfg.device,
    )


def trial_bound(cfg: StudyConfig, data: Dataset, run: TwinRun) -> TrajectoryBound:
    """The trajectory bound of a trained twin (DESIGN.md §2), on the recorded arrays and the risks
    along them, with the configuration's trajectory share of δ_λ (grid.py)."""
    along = trajectory_measures(data, run, cfg.bound.loss_clip)  # None: sketched iterates
    return trajectory_bound(
        run.trajectories[S_RUN],
        run.trajectories[H_RUN],
        run.grad_norms,
        train_risk_clipped=run.final["train/loss_clipped"],
        n_train=len(data.train.y),
        loss_clip=cfg.bound.loss_clip,
        delta=grid.statement_deltas(cfg)["trajectory"],
        risks_s=along.risks_s if along else None,
        risks_h=along.risks_h if along else None,
        lipschitz_pop=along.lipschitz_pop if along else None,
    )


def evaluate(cfg: StudyConfig, data: Dataset, params: dict[str, Any]) -> TrialOutcome:
    """Train both runs with ``params`` (a configuration of the grid Λ) and compute the trajectory
    bound and the held-out certificate (DESIGN.md §2); the other certificates and diagnostics too
    when the study asks for them in every trial (else search/certification.py)."""
    settings = train_settings(cfg, params)
    trainer_knobs = ("learning_rate", "batch_size", *TRAINING_KNOBS, *NOISE_KNOBS)
    model_knobs = {k: v for k, v in params.items() if k not in trainer_knobs}
    spec = model_spec(cfg.model, data.n_features, data.n_outputs, model_knobs)
    run = train_twin(data, spec, settings)
    deltas = grid.statement_deltas(cfg)
    started = time.perf_counter()
    bound = trial_bound(cfg, data, run)
    run.seconds["bound"] = time.perf_counter() - started
    started = time.perf_counter()
    held = heldout(cfg, data, run, deltas["heldout"])
    run.seconds["heldout"] = time.perf_counter() - started
    measured = None
    if cfg.diagnose_every_trial:
        started = time.perf_counter()
        measured = measure(cfg, data, settings, run, bound, deltas)
        run.seconds["diagnostics"] = time.perf_counter() - started
    started = time.perf_counter()
    estimates = heldout_estimates(data, run)
    run.seconds["heldout_estimates"] = time.perf_counter() - started
    if "crossfit_loss" in cfg.objectives and "crossfit" in estimates.skipped:  # every trial would fail
        raise ConfigError(
            "objectives.minimize",
            f"cannot use crossfit_loss: {estimates.skipped['crossfit']}",
            "crossfit_loss",
        )
    outcome = TrialOutcome(params, settings, spec, run, bound, measured, held, deltas, estimates)
    for name in cfg.objectives:
        if not math.isfinite(outcome.objective(name)):
            raise DivergedError(f"objective {name} is {outcome.objective(name)}", settings.steps)
    return outcome


def write_artifacts(outcome: TrialOutcome, folder: Path) -> None:
    """Both trajectories and the S-run's final model, enough to rebuild it."""
    run = outcome.run
    # Uncompressed: float32 weights compress by under 10%, and compressing took longer than training.
    np.savez(
        folder / "trajectories.npz",
        record_steps=run.record_steps,
        empirical=run.trajectories[S_RUN],
        reference=run.trajectories[H_RUN],
        grad_norms=run.grad_norms,
        sketch_dim=run.sketch_dim,  # 0: iterates in full; k: JL sketches (hsgd_tune/train/sketch.py)
    )
    model_dir = folder / "model"
    model_dir.mkdir()
    torch.save(run.model.state_dict(), model_dir / "state_dict.pt")
    (model_dir / "spec.json").write_text(json.dumps(outcome.spec.to_dict(), indent=2))
    (folder / "trial.json").write_text(
        json.dumps({"params": outcome.params, "metrics": outcome.metrics()}, indent=2)
    )


#: Held-out estimates kept in the Optuna trial too, with their standard errors (rank's rules use them).
RANK_ESTIMATES = ("val/loss_se", "heldout/loss", "heldout/loss_se", "crossfit/loss", "crossfit/loss_se")

#: Diagnostics kept in the Optuna trial too when measured inside it (report.py draws a heatmap of α̂;
#: the certificate is read from MLflow, where certificates computed after the study also are).
SUMMARY_MEASURES = ("tail/alpha",)


class Objective:
    """The function Optuna calls: one trial, logged to its own MLflow child run."""

    def __init__(
        self,
        cfg: StudyConfig,
        data: Dataset,
        tracker: Tracker,
        experiment_id: str,
        parent_id: str,
    ):
        self.cfg, self.data, self.tracker = cfg, data, tracker
        self.experiment_id, self.parent_id = experiment_id, parent_id
        self.fixed_params = {f"config.{k}": v for k, v in config_params(cfg).items()}

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        params = sample_params(trial, self.cfg)
        trial.set_user_attr("worker", worker_identity())
        run_id = self.tracker.start_trial(
            self.experiment_id, self.parent_id, self.cfg.name, trial.number, {**params, **self.fixed_params}
        )
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            outcome = evaluate(self.cfg, self.data, params)
        except DivergedError as exc:
            trial.set_user_attr(FAIL_REASON, str(exc))
            self.tracker.finish_trial(run_id, "FAIL", tags={"hsgd.fail_reason": str(exc)})
            raise
        except BaseException as exc:  # interrupted or a bug: the run must not stay RUNNING
            self.tracker.finish_trial(
                run_id, "FAIL", tags={"hsgd.fail_reason": f"{type(exc).__name__}: {exc}"[:500]}
            )
            raise
        try:
            self._log(trial, run_id, outcome)
        except BaseException as exc:  # a full disk, a read-only store: the run must not stay RUNNING
            with contextlib.suppress(Exception):  # best effort: the store may refuse this too
                self.tracker.finish_trial(run_id, "FAIL", tags={"hsgd.fail_reason": f"logging failed: {exc}"})
            raise
        return tuple(outcome.objective(name) for name in self.cfg.objectives)

    def _log(self, trial: optuna.Trial, run_id: str, outcome: TrialOutcome) -> None:
        started = time.perf_counter()
        attrs = dict(outcome.bound.metrics())
        for key in ("val/loss", "val/error", "train/loss"):
            attrs[key] = outcome.run.final[key]
        estimates = outcome.heldout.metrics() if outcome.heldout is not None else {}
        for key in RANK_ESTIMATES:  # for rank's rules; the errors go to MLflow only (fewer writes)
            if key in estimates:
                attrs[key] = estimates[key]
        measured = outcome.measured.metrics if outcome.measured is not None else {}
        for key in SUMMARY_MEASURES:  # for rank and report, when the trial measured them itself
            if math.isfinite(measured.get(key, math.nan)):
                attrs[key] = measured[key]
        set_user_attrs(trial, attrs)  # one journal append / transaction, not one per attribute
        curves = {name: (outcome.run.record_steps, values) for name, values in outcome.run.curves.items()}
        folder = self.tracker.local_artifact_dir(run_id)  # local store: written in place, once
        artifacts = Path(tempfile.mkdtemp(prefix="hsgd-trial-")) if folder is None else None  # uploaded
        (folder or artifacts).mkdir(parents=True, exist_ok=True)
        write_artifacts(outcome, folder or artifacts)
        # Final metrics sit at the last step, where the val/loss curve ends at the same value.
        # time/logging_s cannot include the batch that carries it: it is the logging before it
        # (benchmarks/overhead.py times the whole trial).
        metrics = {**outcome.metrics(), "time/logging_s": time.perf_counter() - started}
        self.tracker.finish_trial(
            run_id, "COMPLETE", outcome.tags(), metrics, outcome.settings.steps, curves, artifacts
        )
