"""Picking a configuration: export a trial as a standalone study file, register its model, and train
an exported configuration again.

The exported file is an ordinary study file whose search space holds one value per hyperparameter
(``choices = [value]``), so the project's own loader reads it back, and ``hsgd-tune train`` (or
``run``) trains exactly that configuration. Trials use common random numbers (seed = study seed), so
training it again gives the trial's result. The model goes to the MLflow Model Registry with an
alias (aliases, not the deprecated stages), so production loads ``models:/<name>@<alias>``.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from hsgd_tune.config import StudyConfig, load_study
from hsgd_tune.errors import ConfigError, HsgdError
from hsgd_tune.ranking import Ranking
from hsgd_tune.studyfile import dumps_toml, study_file_dict
from hsgd_tune.tracking import STUDY_TAG, TRIAL_TAG, Tracker, trial_run_name


def exported_config(ranking: Ranking, cfg: StudyConfig, number: int) -> str:
    """TOML text of trial ``number`` as a study of one configuration, with where it came from."""
    trial = ranking.trial(number)
    doc = study_file_dict(cfg.to_dict(), fixed=trial.params)
    doc["name"] = f"{cfg.name}-{trial_run_name(number)}"
    # δ stays divided over the original study's configuration grid, so the exported bound states the
    # same thing (a single configuration alone would claim δ·1 instead of δ/|Λ|).
    doc["bound"]["grid_size"] = int(ranking.study.user_attrs.get("grid_size", cfg.grid_size))
    doc["run"] = {"n_trials": 1}
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
) -> list[str]:
    """Export trial ``number`` (default: the recommended one), certify it if it has no certificate
    yet (``lock``: the study's, see certify.py), log and register its model, and set ``alias`` on the
    new version. Everything is checked before anything is written; the exported file appears only
    once the model is registered. Returns the lines to show the user."""
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
        if dry_run:
            return [
                *lines,
                certificate_line(ranking, cfg, tracker, number, dry_run=True),
                f"would register the model of run {run_id} as {model_name!r} with alias {alias!r}",
            ]
        # The model going to production gets its certificate, whatever the study's [diagnostics].
        lines.append(certificate_line(ranking, cfg, tracker, number, lock=lock))
        version = register_model(tracker, run_id, model_name, alias, ranking.name, number)
        draft.replace(out)
    return [
        *lines,
        f"registered {model_name!r} version {version} (run {run_id}) with alias {alias!r}",
        f"load it with: mlflow.pytorch.load_model('models:/{model_name}@{alias}')",
    ]


def certificate_line(
    ranking: Ranking, cfg: StudyConfig, tracker: Tracker, number: int, dry_run: bool = False, lock=None
) -> str:
    """The picked trial's certificate, computed first when its run has none (not in a dry run)."""
    from hsgd_tune.certify import certify, recorded

    if not cfg.certificate.enabled:
        return f"no certificate for trial {number}: the study has [certificate] enabled = false"
    found = recorded(ranking.study, tracker, number)
    if found is None and dry_run:
        return f"would certify trial {number} first (it has no certificate yet)"
    if found is None:
        found = certify(ranking.study, cfg, tracker, [number], lock=lock)[0]
    return found.line() + (" — computed now" if found.computed and math.isfinite(found.bound) else "")


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def register_model(tracker: Tracker, run_id: str, name: str, alias: str, study: str, number: int) -> str:
    """Rebuild the trial's model from its ``model/`` artifacts, log it with MLflow's PyTorch flavour
    in the trial's run, register it as ``name`` and point ``alias`` at the new version."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model, n_features = load_trial_model(tracker, run_id)
    example = torch.zeros(1, n_features)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    mlflow.set_tracking_uri(tracker.uri)
    # Reopening the finished trial run links the logged model to it; closing it sets FINISHED again.
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # Pickle, not MLflow's new default 'pt2': a pt2 export fixes the batch size to the example's
        # (a served model would then refuse other batch sizes). MLflow warns that pickle is legacy.
        warnings.simplefilter("ignore", FutureWarning)
        info = mlflow.pytorch.log_model(
            model,
            name="registered_model",
            signature=signature,
            serialization_format="pickle",
            registered_model_name=name,
            # Pinned, so MLflow need not load the model in a subprocess to infer requirements.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    version = str(info.registered_model_version)
    client = tracker.client
    client.set_registered_model_alias(name, alias, version)
    for key, value in {STUDY_TAG: study, TRIAL_TAG: str(number), "hsgd.run_id": run_id}.items():
        client.set_model_version_tag(name, version, key, value)
    tracker.log(run_id, tags={"hsgd.registered_model": f"{name}/{version}@{alias}"})
    return version


def load_trial_model(tracker: Tracker, run_id: str):
    """The trial's final S-run model, rebuilt from ``model/spec.json`` and ``model/state_dict.pt``."""
    from hsgd_tune.certify import read_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as tmp:
        model, spec = read_model(Path(tracker.client.download_artifacts(run_id, "model", tmp)))
    return model.eval(), spec.n_features


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


def train_config(path: Path, out: Path | None = None) -> list[str]:
    """Train the configuration in ``path`` (twin run and bound, as its trial did); with ``out``,
    save the model, trajectories and metrics there. Returns the lines to show the user."""
    from hsgd_tune.objective import evaluate, write_artifacts
    from hsgd_tune.runner import prepare

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
    return lines
