"""Loading a registered champion as production would: a fresh Python process, MLflow's pyfunc API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

# Runs in the fresh process: load each model, predict on the CSV of raw rows next to it, and print
# the predictions (json keeps every float digit) with every warning raised on the way.
_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import mlflow
    import pandas as pd
    mlflow.set_tracking_uri("sqlite:///mlruns/mlflow.db")
    answers = {}
    for uri, rows in json.loads(sys.argv[1]).items():
        model = mlflow.pyfunc.load_model(uri)
        answers[uri] = model.predict(pd.read_csv(rows)).to_dict(orient="list")
print(json.dumps({"answers": answers, "warnings": [str(w.message) for w in caught]}))
"""


def predict_in_fresh_process(folder: Path, requests: dict[str, Path]) -> tuple[dict[str, pd.DataFrame], str]:
    """``{model URI: CSV of raw rows}`` → ``{URI: predictions}``, and everything the process warned
    (warnings and stderr together), for the models of the default store under ``folder``."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps({uri: str(path) for uri, path in requests.items()})],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a failsafe: a fresh MLflow import takes seconds, minutes on a saturated machine
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    answers = {uri: pd.DataFrame(columns) for uri, columns in result["answers"].items()}
    return answers, "\n".join(result["warnings"]) + "\n" + done.stderr
