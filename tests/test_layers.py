"""The package's layering (pyproject.toml [tool.importlinter], README "Layout"): the contracts hold on
the code as it is, and they would catch a circle or a layer broken by a new import."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the package under ``root`` with this repository's contracts."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--config",
            str(REPO / "pyproject.toml"),
            "--no-cache",
        ],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_package_keeps_its_contracts():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.fixture
def scratch_package(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "hsgd_tune", tmp_path / "hsgd_tune", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize(
    ("module", "new_import", "broken"),
    [
        # storage.py is imported by worker.py: importing worker back closes a circle inside search/
        ("search/storage.py", "from hsgd_tune.search import worker", "No import circle"),
        # a lower stage reaching up: the twin run importing the Optuna side
        ("train/twin.py", "from hsgd_tune.search import study", "Each pipeline stage"),
        # the bound engine importing torch
        ("bound/distance.py", "import torch", "The bound engine is pure"),
    ],
)
def test_a_new_import_that_breaks_the_layering_fails(scratch_package, module, new_import, broken):
    path = scratch_package / "hsgd_tune" / module
    path.write_text(path.read_text() + f"\n{new_import}  # noqa\n")
    result = lint_imports(scratch_package)
    assert result.returncode != 0
    assert f"{broken}" in result.stdout
    assert "BROKEN" in result.stdout
