"""Raw rows through the registered champion, against the bare network (what `pick` used to register).

Run it in the folder of a picked study on digits (after `hsgd-tune run` and `hsgd-tune pick`), e.g.
the quick-start::

    hsgd-tune run studies/quickstart.toml && hsgd-tune pick studies/quickstart.toml
    python -m benchmarks.champion studies/quickstart.toml

It feeds the study's raw validation rows (scikit-learn's digits, not standardised) to the model
registered as ``hsgd-<study>@champion`` through ``mlflow.pyfunc``, and to the trial's bare network,
and prints both accuracies next to the trial's own (1 − val/error, on the rows as the study
standardised them).
"""

from __future__ import annotations

import argparse
import os

import mlflow
import numpy as np
import torch
from sklearn.datasets import load_digits

from hsgd_tune.advise.pick import load_trial_model
from hsgd_tune.data.datasets import split_indices
from hsgd_tune.studyfile.config import load_study
from hsgd_tune.track.tracker import Tracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a picked digits study file")
    cfg = load_study(parser.parse_args().study)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    rows = split_indices(1797, cfg.data, cfg.seed)["val"]
    digits = load_digits(as_frame=True)
    raw, truth = digits.data.iloc[rows], digits.target.to_numpy()[rows]
    tracker = Tracker()
    name = f"hsgd-{cfg.name}"
    version = tracker.client.get_model_version_by_alias(name, "champion")
    trial_run = version.tags["hsgd.trial_run_id"]
    mlflow.set_tracking_uri(tracker.uri)
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(raw)["prediction"].to_numpy()
    network, _ = load_trial_model(tracker, trial_run)
    with torch.no_grad():
        bare = network(torch.tensor(raw.to_numpy(), dtype=torch.float32)).argmax(dim=1).numpy()
    val_error = tracker.client.get_run(trial_run).data.metrics["val/error"]
    trial = version.tags["optuna.trial_number"]
    print(f"{name} version {version.version}: trial {trial}, {len(rows)} raw V rows")
    print(f"  registered model (pyfunc) on raw rows: accuracy {np.mean(served == truth):.4f}")
    print(f"  bare network on raw rows:              accuracy {np.mean(bare == truth):.4f}")
    print(f"  the trial's own (1 - val/error):       accuracy {1 - val_error:.4f}")


if __name__ == "__main__":
    main()
