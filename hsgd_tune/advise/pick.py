"""Picking a configuration: export a trial as a standalone study file, register a production model,
and train an exported configuration again.

The exported file is an ordinary study file whose search space holds one value per hyperparameter
(``choices = [value]``), so the project's own loader reads it back, and ``hsgd-tune train`` (or
``run``) trains exactly that configuration. Trials use common random numbers (seed = study seed), so
training it again gives the trial's result.

The registered model is a complete predictor (:mod:`hsgd_tune.advise.serving`): raw feature rows in, class
labels and probabilities or regression outputs in the target's units out. By default it is the
trial's own S-model, the model its certificates are about; with ``refit`` the chosen configuration is
trained again on every labelled row of the study (S ∪ H ∪ V), and the trial's certificates do not
cover it. Either way the model is logged in a run of its own that records its lineage (study, trial,
data fingerprint): the trial's finished run is never reopened, so its times stay as they were. The
version goes to the MLflow Model Registry with an alias (aliases, not the deprecated stages), so
production loads ``models:/<name>@<alias>``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsgd_tune.advise.ranking import Ranking
from hsgd_tune.data.datasets import Dataset, Split
from hsgd_tune.errors import ConfigError, HsgdError
from hsgd_tune.search.prepare import prepare
from hsgd_tune.studyfile.config import NOISE_KNOBS, TRAINING_KNOBS, StudyConfig, load_study
from hsgd_tune.studyfile.export import dumps_toml, study_file_dict
from hsgd_tune.track.tracker import ROLE_TAG, STUDY_TAG, TRIAL_TAG, Tracker, fluent_run, trial_run_name
from hsgd_tune.train.models import ModelSpec, model_spec

#: ``hsgd.role`` of the runs this module creates (a trial's run has "trial", a study's "study").
CHAMPION_ROLE, TRAIN_ROLE = "champion", "train"
#: Tags of a registered version (and of its lineage run) that say where it comes from.
TRIAL_RUN_TAG, DATA_TAG, STUDY_FINGERPRINT_TAG = (
    "hsgd.trial_run_id",
    "hsgd.data_fingerprint",
    "hsgd.study_fingerprint",
)
MODEL_TAG, STATEMENT_TAG = "hsgd.model", "hsgd.certificate.statement"


def exported_config(ranking: Ranking, cfg: StudyConfig, number: int) -> str:
    """TOML text of trial ``number`` as a study of one configuration, with where it came from."""
    trial = ranking.trial(number)
    doc = study_file_dict(cfg.to_dict(), fixed=trial.params)
    doc["name"] = f"{cfg.name}-{trial_run_name(number)}"
    # δ stays divided over the original study's configuration grid, so the exported bound states the
    # same thing (a single configuration alone would claim δ·1 instead of δ/|Λ|).
    doc["bound"]["grid_size"] = int(ranking.study.user_attrs.get("grid_size", cfg.grid_size))
    # `hsgd-tune train` logs its run next to the study's trials, in the study's experiment.
    doc["run"] = {"n_trials": 1, "experiment": cfg.experiment_name}
    values = ", ".join(
        f"{k} = {trial.user_attrs[k]:.6g}" for k in ("train/loss", "val/loss") if k in trial.user_attrs
    )
    header = [
        f"# Trial {number} of study {cfg.name!r}, exported by `hsgd-tune pick`.",
        f"# Its results: {values}; objectives {dict(zip(cfg.objectives, trial.values, strict=True))}.",
        "# Train it again with: hsgd-tune train THIS_FILE.toml (same seed, same result).",
    ]
    if cfg.model.entry_point:
        header.append(
            f"# The model's entry point {cfg.model.entry_point!r} must be importable next to this file."
        )
    return "\n".join(header) + "\n\n" + dumps_toml(doc)


def pick(
    ranking: Ranking,
    cfg: StudyConfig,
    number: int | None,
    out: Path | None,
    model_name: str | None,
    alias: str,
    force: bool = False,
    dry_run: bool = False,
    lock=None,
    refit: bool = False,
) -> list[str]:
    """Export trial ``number`` (default: the recommended one) and register a production model of it:
    its own S-model, certified first if it has no certificate yet (``lock``: the study's, see
    search/certification.py), or with ``refit`` its configuration trained again on S ∪ H ∪ V.
    ``alias`` moves to the new version. Everything is checked before anything is written; the
    exported file appears only once the model is registered. Returns the lines to show the user."""
    number = ranking.recommended if number is None else number
    trial = ranking.trial(number)
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id is None:
        raise HsgdError(f"trial {number} of study {ranking.name!r} has no MLflow run to take the model from")
    out = out or Path(f"{cfg.name}-{trial_run_name(number)}.toml")
    model_name = model_name or f"hsgd-{cfg.name}"
    if out.exists() and not force:
        raise ConfigError("--out", "must not exist (use --force to overwrite)", str(out))
    if not out.parent.is_dir():
        raise ConfigError("--out", "must be in an existing folder", str(out))
    if not alias or any(c in alias for c in "/@: "):
        raise ConfigError("--alias", "must be a name without '/', '@', ':' or spaces", alias)
    text = exported_config(ranking, cfg, number)
    tracker = Tracker()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".pick-") as tmp:
        draft = Path(tmp) / out.name
        draft.write_text(text, encoding="utf-8")
        load_study(draft)  # the exported file must load back through the project's loader
        lines = [
            f"trial {number} of {ranking.name} ({_params(trial.params)})"
            + (" — the recommended trial" if number == ranking.recommended else ""),
            f"{'would export' if dry_run else 'exported'} {out}",
        ]
        what = (
            f"trial {number}'s configuration retrained on S ∪ H ∪ V" if refit else f"trial {number}'s model"
        )
        if dry_run:
            first = REFIT_LINE if refit else certificate_line(ranking, cfg, tracker, number, dry_run=True)
            return [*lines, first, f"would register {what} as {model_name!r} with alias {alias!r}"]

        data = prepare(cfg)
        if refit:
            lines.append(REFIT_LINE)
            candidate = refit_candidate(cfg, data, trial.params)
        else:
            candidate = trial_candidate(tracker, data, trial)
            # The S-model going to production gets its certificate, whatever the study's [diagnostics].
            lines.append(certificate_line(ranking, cfg, tracker, number, lock=lock, data=data))
        version, lineage_run = register(tracker, ranking, cfg, number, candidate, model_name, alias)
        draft.replace(out)
    return [
        *lines,
        f"registered {what} as {model_name!r} version {version} with alias {alias!r} "
        f"(lineage: run {lineage_run})",
        f"load it with: mlflow.pyfunc.load_model('models:/{model_name}@{alias}')",
    ]


REFIT_LINE = (
    "refit: the configuration is trained again on S ∪ H ∪ V; the trial's certificates are about its "
    "S-model and do not cover the refitted model"
)


def certificate_line(
    ranking: Ranking,
    cfg: StudyConfig,
    tracker: Tracker,
    number: int,
    dry_run: bool = False,
    lock=None,
    data: Dataset | None = None,
) -> str:
    """The picked trial's certificate, computed first when its run has none (not in a dry run)."""
    from hsgd_tune.search.certification import certify, recorded

    if not cfg.certificate.enabled:
        return f"no certificate for trial {number}: the study has [certificate] enabled = false"
    found = recorded(ranking.study, tracker, number)
    if found is None and dry_run:
        return f"would certify trial {number} first (it has no certificate yet)"
    if found is None:
        found = certify(ranking.study, cfg, tracker, [number], data=data, lock=lock)[0]
    return found.line() + (" — computed now" if found.computed and math.isfinite(found.bound) else "")


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ---------------------------------------------------------------------------------------------
# The model to register: the trial's own, or its configuration refitted
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A model for production with what is known about it."""

    model: torch.nn.Module
    spec: ModelSpec
    data: Dataset  # its preprocessing ships with the model
    refit: bool
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # for the lineage run


def trial_candidate(tracker: Tracker, data: Dataset, trial) -> Candidate:
    """The trial's final S-run model, checked against today's data: the preprocessing shipped with
    it must be the one it was trained with (a CSV edited since would silently shift every input)."""
    model, spec = load_trial_model(tracker, trial.user_attrs["mlflow_run_id"])
    then, now = trial.user_attrs["val/loss"], _loss(model, data.val, data.task)
    if not math.isclose(now, then, rel_tol=1e-4, abs_tol=1e-6):
        raise HsgdError(
            f"the data ({data.description}) changed since trial {trial.number} was trained: its "
            f"model's validation loss is {now:.6g} on today's rows, {then:.6g} when it was trained"
        )
    return Candidate(model, spec, data, refit=False)


def refit_candidate(cfg: StudyConfig, data: Dataset, params: dict[str, Any]) -> Candidate:
    """Train the configuration ``params`` on S ∪ H ∪ V with the study's preprocessing (H's means and
    scales: the learning rate was tuned on that scale) and the trial's SGD recursion, seed and steps.
    The twin run's reference half (on H) is only along for the ride: nothing is certified here."""
    from hsgd_tune.search.objective import train_settings
    from hsgd_tune.train.twin import train_twin

    parts = [data.train, data.reference] + ([] if data.val is data.reference else [data.val])
    rows = Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    trainer_knobs = ("learning_rate", "batch_size", *TRAINING_KNOBS, *NOISE_KNOBS)  # as evaluate() splits
    knobs = {k: v for k, v in params.items() if k not in trainer_knobs}
    spec = model_spec(cfg.model, data.n_features, data.n_outputs, knobs)
    run = train_twin(dataclasses.replace(data, train=rows), spec, train_settings(cfg, params))
    metrics = {
        "refit/n_rows": len(rows),
        "refit/train_loss": run.final["train/loss"],
        "refit/train_error": run.final["train/error"],
    }
    return Candidate(run.model.eval(), spec, data, refit=True, metrics=metrics)


def _loss(model: torch.nn.Module, split: Split, task: str) -> float:
    from hsgd_tune.train.twin import per_example_loss

    with torch.no_grad():
        return float(per_example_loss(model(torch.as_tensor(split.x)), torch.as_tensor(split.y), task).mean())


def load_trial_model(tracker: Tracker, run_id: str) -> tuple[torch.nn.Module, ModelSpec]:
    """The trial's final S-run model, rebuilt from ``model/spec.json`` and ``model/state_dict.pt``."""
    from hsgd_tune.search.certification import read_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        model, spec = read_model(Path(tracker.client.download_artifacts(run_id, "model", tmp)))
    return model.eval(), spec


# ---------------------------------------------------------------------------------------------
# Registering it, with its lineage and its certificates
# ---------------------------------------------------------------------------------------------


def register(
    tracker: Tracker,
    ranking: Ranking,
    cfg: StudyConfig,
    number: int,
    candidate: Candidate,
    name: str,
    alias: str,
) -> tuple[str, str]:
    """Log ``candidate`` as a pyfunc predictor in a new run of the study's experiment (the lineage
    run, a child of the study's run), register it as ``name``, tag and describe the version, and
    point ``alias`` at it. Returns the version and the lineage run's id."""
    from hsgd_tune.advise.serving import data_fingerprint, log_predictor
    from hsgd_tune.search.objective import config_params

    study = ranking.study
    trial = ranking.trial(number)
    lineage = {
        STUDY_TAG: cfg.name,
        TRIAL_TAG: str(number),
        TRIAL_RUN_TAG: trial.user_attrs["mlflow_run_id"],
        DATA_TAG: data_fingerprint(candidate.data),
        STUDY_FINGERPRINT_TAG: str(study.user_attrs.get("fingerprint", cfg.fingerprint())),
        MODEL_TAG: _model_text(candidate, number),
    }
    tags = {**lineage, ROLE_TAG: CHAMPION_ROLE}
    if parent := study.user_attrs.get("mlflow_parent_run_id"):
        tags["mlflow.parentRunId"] = parent
    params = {**trial.params, **{f"config.{k}": v for k, v in config_params(cfg).items()}}
    experiment_id = tracker.experiment_id(cfg.experiment_name)
    run_name = f"{'refit' if candidate.refit else 'pick'}-{trial_run_name(number)}"
    # Read now, after pick certified the trial if it had to: its certificates are the run's metrics.
    trial_run = None if candidate.refit else tracker.client.get_run(lineage[TRIAL_RUN_TAG])
    shown = ("train/", "val/", "bound/risk_bound", "certificate/")
    metrics = candidate.metrics or {k: v for k, v in trial_run.data.metrics.items() if k.startswith(shown)}
    run_id = tracker.create_run(experiment_id, run_name, tags, params)
    with fluent_run(tracker.uri, run_id):  # ends FINISHED, or FAILED if anything below raises
        tracker.log(run_id, metrics=metrics)
        version = str(
            log_predictor(candidate.model, candidate.spec, candidate.data, name).registered_model_version
        )
        certificates, statement = certificate_statement(cfg, study, number, candidate, trial_run)
        description = "\n\n".join([_model_text(candidate, number), statement, _lineage_text(lineage, run_id)])
        tracker.describe_version(name, version, {**lineage, **certificates}, description, alias)
        tracker.log(run_id, tags={"hsgd.registered_model": f"{name}/{version}@{alias}"})
    return version, run_id


def _model_text(candidate: Candidate, number: int) -> str:
    data = candidate.data
    n = len(data.train)
    if candidate.refit:
        n_rows = int(candidate.metrics["refit/n_rows"])
        trained = f"trial {number}'s configuration trained again on S ∪ H ∪ V ({n_rows} rows)"
    else:
        trained = (
            f"trial {number}'s model: the final weights of its SGD run on the training split S ({n} rows)"
        )
    return (
        f"{trained} of {data.description}, served with the study's preprocessing: features standardised "
        "with the reference split H's means and scales, answers as class labels and probabilities or "
        "in the target's units."
    )


def _lineage_text(lineage: dict[str, str], run_id: str) -> str:
    return "Lineage: " + ", ".join(
        [f"run {run_id}", *(f"{k} = {v}" for k, v in lineage.items() if k != MODEL_TAG)]
    )


def certificate_statement(
    cfg: StudyConfig, study, number: int, candidate: Candidate, run
) -> tuple[dict[str, str], str]:
    """The version's certificate tags (the trial's ``certificate/…`` numbers and the statement they
    make: which model, which data, which δ) and the statement as text."""
    if candidate.refit:
        statement = (
            f"Not certified. Trial {number}'s certificates are about its S-model, trained on S alone with "
            "H held out; this model was trained on S ∪ H ∪ V, so they do not cover it, and no held-out "
            "rows are left to certify it with."
        )
        return {"hsgd.certificate": "none", STATEMENT_TAG: statement}, statement
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("certificate/")}
    tags = run.data.tags
    certified = {  # the certified numbers, each with what it rests on (its hsgd.assumption tag)
        k: v
        for k, v in sorted(metrics.items())
        if tags.get(f"hsgd.assumption.{k}", "").startswith("certified")
    }
    if not certified:
        why = tags.get("hsgd.diagnostics", "its run holds no certified number")
        statement = f"Not certified: trial {number} has no certificate ({why})."
        return {"hsgd.certificate": "none", STATEMENT_TAG: statement}, statement
    data = candidate.data
    grid = int(study.user_attrs.get("grid_size", cfg.grid_size))
    error = (
        "0-1 error"
        if data.task == "classification"
        else f"loss clipped at B = {cfg.bound.loss_clip:g}, over B"
    )
    lines = [
        f"With probability at least 1 − {cfg.bound.delta:g} over the draw of the study's data, the "
        f"statements below hold together, and with those of every other configuration of study "
        f"{cfg.name!r} (a union over its grid of {grid} configurations: each gets δ_λ = δ/{grid}, split "
        "among its statements, bound/delta_<statement>). They are about models trained on trial "
        f"{number}'s training split S ({len(data.train)} rows) with H held out; error means the "
        f"{error}, expected error its mean on new rows from the distribution of {data.description}:"
    ]
    lines += [f"- {k} = {v:.4g}: {tags[f'hsgd.assumption.{k}']}" for k, v in certified.items()]
    if "certificate/heldout_error" in certified:
        lines.append(
            "certificate/heldout_error is about the very weights this version serves (the final S-model)."
        )
    if "certificate/bound" in certified:
        lines.append(
            "certificate/bound is about the stochastic predictor Q = N(μ, diag s²) around these weights, "
            "whose weights are drawn afresh for each prediction, not about the weights this version serves"
            + (
                "; it is vacuous (it does not beat guessing, or 0.5)."
                if tags.get("hsgd.vacuous.certificate") == "true"
                else "."
            )
        )
    statement = "\n".join(lines)
    deltas = {k: v for k, v in run.data.metrics.items() if k.startswith("bound/delta")}
    version_tags = {k: f"{v:.6g}" for k, v in {**metrics, **deltas}.items()}
    headline = (
        "certificate/heldout_error" if "certificate/heldout_error" in certified else next(iter(certified))
    )
    version_tags |= {"hsgd.certificate": headline, STATEMENT_TAG: statement}
    version_tags["hsgd.certificate.delta"] = f"{cfg.bound.delta:g} over a grid of {grid} configurations"
    return version_tags, statement


# ---------------------------------------------------------------------------------------------
# Training an exported configuration
# ---------------------------------------------------------------------------------------------


def fixed_params(cfg: StudyConfig) -> dict[str, Any]:
    """The one value of each hyperparameter; a ConfigError names the first knob with a range."""
    params = {}
    for knob in cfg.search.all_knobs():
        if knob.kind != "categorical" or len(knob.choices) != 1:
            key = knob.name if knob.name in ("learning_rate", "batch_size") else f"knobs.{knob.name}"
            shown = list(knob.choices) if knob.choices else [knob.low, knob.high]
            raise ConfigError(
                f"search.{key}", "must hold one value (choices = [value]) to train one configuration", shown
            ).in_file(cfg.source_file)
        params[knob.name] = knob.choices[0]
    return params


def train_config(path: Path, out: Path | None = None, log: bool = True) -> list[str]:
    """Train the configuration in ``path`` (twin run and bound, as its trial did); with ``out``,
    save the model, trajectories and metrics there; with ``log``, log a run (params, metrics, tags
    and the model as a pyfunc predictor) in the study file's MLflow experiment, which is the original
    study's for a file written by ``pick``. Returns the lines to show the user."""
    from hsgd_tune.search.objective import evaluate, write_artifacts
    from hsgd_tune.search.prepare import prepare

    cfg = load_study(path)
    params = fixed_params(cfg)
    if out is not None and out.exists():
        raise ConfigError("--out", "must not exist yet", str(out))
    data = prepare(cfg)
    outcome = evaluate(cfg, data, params)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".train-") as tmp:
            write_artifacts(outcome, Path(tmp))
            Path(tmp).rename(out)
            Path(tmp).mkdir()  # so that the context manager has something to remove
    final = outcome.metrics()
    shown = ("train/loss", "val/loss", "val/error", "bound/risk_bound")
    lines = [f"{cfg.name} ({_params(params)}): " + ", ".join(f"{k} = {final[k]:.6g}" for k in shown)]
    if out is not None:
        lines.append(f"saved model, trajectories and metrics in {out}")
    if log:
        run_id = log_training(cfg, data, outcome)
        lines.append(
            f"logged run {run_id} in MLflow experiment {cfg.experiment_name!r}; "
            f"its model: mlflow.pyfunc.load_model('runs:/{run_id}/model')"
        )
    return lines


def log_training(cfg: StudyConfig, data: Dataset, outcome) -> str:
    """One run for a ``train``: the config as params, every metric and curve a trial logs, the
    trial's assumption tags, and the model as a pyfunc predictor (not registered). Its id."""
    from hsgd_tune.advise.serving import data_fingerprint, log_predictor
    from hsgd_tune.search.objective import config_params

    tracker = Tracker()
    experiment_id = tracker.experiment_id(cfg.experiment_name)
    tags = {ROLE_TAG: TRAIN_ROLE, STUDY_TAG: cfg.name, DATA_TAG: data_fingerprint(data), **outcome.tags()}
    params = {**outcome.params, **{f"config.{k}": v for k, v in config_params(cfg).items()}}
    run_id = tracker.create_run(experiment_id, f"train-{cfg.name}", tags, params)
    curves = {name: (outcome.run.record_steps, values) for name, values in outcome.run.curves.items()}
    with fluent_run(tracker.uri, run_id):
        tracker.log(run_id, metrics=outcome.metrics(), step=outcome.settings.steps, curves=curves)
        log_predictor(outcome.run.model.eval(), outcome.spec, data)
    return run_id
