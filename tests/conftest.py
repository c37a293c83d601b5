"""Shared fixtures: a clean working directory per test, as a user's first run would see."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside an empty ``tmp_path`` with the default stores.

    ``mlruns/`` (Optuna journal, MLflow database) is relative to the working directory, so it lands
    in ``tmp_path``; ``MLFLOW_TRACKING_URI`` is unset so the default applies; whatever a study's entry
    point adds to ``sys.path`` is undone afterwards.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: torch's intra-op threads cost more than they give, and on a busy machine their
    spinning makes a 50-step run take seconds instead of a tenth of one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
