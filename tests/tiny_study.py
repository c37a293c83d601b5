"""A study small enough to run inside a test (a few seconds): shared by the advisor's tests."""

from __future__ import annotations

from pathlib import Path

TINY_STUDY = """\
name = "tiny"
seed = 0

[data]
source = "digits"
n_train = 120
n_val = 120

[model]
kind = "mlp"
widths = [16]

[search.learning_rate]
low = 0.01
high = 0.3

[search.batch_size]
choices = [8, 32]

[training]
steps = 60
record_every = 20

[sampler]
kind = "random"

[run]
n_trials = 5
"""


def write_tiny_study(folder: Path, text: str = TINY_STUDY) -> Path:
    path = folder / "tiny.toml"
    path.write_text(text)
    return path


def run_tiny_study(folder: Path, monkeypatch) -> Path:
    """Run the tiny study in ``folder`` (default stores under ``folder/mlruns``); its file's path."""
    from hsgd_tune.search.runner import run_study
    from hsgd_tune.studyfile.config import load_study

    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = write_tiny_study(folder)
    run_study(load_study(path), progress=False)
    return path
